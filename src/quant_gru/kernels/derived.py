"""Values derived from an object on a device, kept as long as the object lives.

The integer realizations derive kernel operands from each DirectionProgram; a program lives as
long as the weights it was made from are in use (quantized_forward.ProgramCache), so entries
go with it, and ids of dead objects never alias a live entry. What depends on a calibration
alone is derived from the programs' terms (or a term), which every program of a calibration
shares.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

Value = TypeVar("Value")
_Key = tuple[int, str, object]


class _Cache(Generic[Value]):
    """make() once per (owner, device, variant); how entries are kept is the subclass's."""

    def get(
        self,
        owner: object,
        device: torch.device,
        make: Callable[[], Value],
        variant: object = None,
    ) -> Value:
        value = self.find(owner, device, variant)
        if value is None:
            value = make()
            self.keep(owner, device, value, variant)
        return value

    def find(self, owner: object, device: torch.device, variant: object = None) -> Value | None:
        """The value kept for (owner, device, variant), or None."""
        return self._find((id(owner), str(device), variant), owner)

    def keep(
        self, owner: object, device: torch.device, value: Value, variant: object = None
    ) -> None:
        """Keep ``value`` for (owner, device, variant), made by the caller."""
        self._keep((id(owner), str(device), variant), owner, value)

    def _find(self, key: _Key, owner: object) -> Value | None:
        raise NotImplementedError

    def _keep(self, key: _Key, owner: object, value: Value) -> None:
        raise NotImplementedError


class DerivedCache(_Cache[Value]):
    """Entries dropped when their owner is collected."""

    def __init__(self) -> None:
        # Each entry holds the weak reference whose callback drops it (a weakref.finalize
        # costs several times as much, and QAT keeps about ten entries a weight update).
        self._entries: dict[_Key, tuple[Value, weakref.ref[object]]] = {}

    def _find(self, key: _Key, owner: object) -> Value | None:
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def _keep(self, key: _Key, owner: object, value: Value) -> None:
        entries = self._entries

        def drop(_: weakref.ref[object]) -> None:
            entries.pop(key, None)

        entries[key] = (value, weakref.ref(owner, drop))

    def __len__(self) -> int:
        return len(self._entries)


class CalibrationCache(_Cache[Value]):
    """For owners that cannot be weakly referenced, such as a program's terms (a mapping made
    once per calibration): entries hold their owner, so its id is not reused while they live,
    and the cache is emptied when it holds ``size`` of them."""

    def __init__(self, size: int = 64) -> None:
        self._entries: dict[_Key, tuple[object, Value]] = {}
        self._size = size

    def _find(self, key: _Key, owner: object) -> Value | None:
        cached = self._entries.get(key)
        return cached[1] if cached is not None and cached[0] is owner else None

    def _keep(self, key: _Key, owner: object, value: Value) -> None:
        if len(self._entries) >= self._size:
            self._entries.clear()
        self._entries[key] = (owner, value)


Stamp = tuple[int, int, tuple[int, ...]]


def tensor_stamp(tensor: torch.Tensor) -> Stamp:
    """What changes when a tensor's values may have: its version counter (in-place updates
    such as an optimizer's step), its storage and its shape (``tensor.data = ...`` keeps the
    version counter)."""
    return tensor._version, tensor.data_ptr(), tuple(tensor.shape)


class TensorCache(Generic[Value]):
    """One value derived from a tensor, kept while the tensor lives and is unmodified
    (``tensor_stamp``); remade otherwise. Inference tensors have no version counter: their
    values are not kept."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Stamp, Value]] = {}

    def get(self, tensor: torch.Tensor, make: Callable[[], Value]) -> Value:
        if tensor.is_inference():
            return make()
        key, stamp = id(tensor), tensor_stamp(tensor)
        cached = self._entries.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        value = make()
        if cached is None:
            weakref.finalize(tensor, self._entries.pop, key, None)
        self._entries[key] = (stamp, value)
        return value

    def __len__(self) -> int:
        return len(self._entries)
