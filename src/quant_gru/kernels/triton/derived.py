"""Values derived from an object on a device, kept exactly as long as the object lives.

The integer realization derives kernel operands from each DirectionProgram; a program lives as
long as the weights it was made from are in use (quantized_forward.ProgramCache), so entries
go with it, and ids of dead objects never alias a live entry.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

Value = TypeVar("Value")


class DerivedCache(Generic[Value]):
    """make(owner) once per (owner, device, variant), dropped when the owner is collected."""

    def __init__(self) -> None:
        self._entries: dict[tuple[int, str, object], Value] = {}

    def get(
        self,
        owner: object,
        device: torch.device,
        make: Callable[[], Value],
        variant: object = None,
    ) -> Value:
        key = (id(owner), str(device), variant)
        value = self._entries.get(key)
        if value is None:
            value = make()
            self._entries[key] = value
            weakref.finalize(owner, self._entries.pop, key, None)
        return value

    def __len__(self) -> int:
        return len(self._entries)


class CalibrationCache(Generic[Value]):
    """make() once per (owner, device, variant) for owners that cannot be weakly referenced,
    such as a program's terms (a mapping made once per calibration and shared by every
    program of it): entries hold their owner, so its id is not reused while they live, and
    the cache is emptied when it holds ``size`` of them."""

    def __init__(self, size: int = 64) -> None:
        self._entries: dict[tuple[int, str, object], tuple[object, Value]] = {}
        self._size = size

    def get(
        self,
        owner: object,
        device: torch.device,
        make: Callable[[], Value],
        variant: object = None,
    ) -> Value:
        key = (id(owner), str(device), variant)
        cached = self._entries.get(key)
        if cached is not None and cached[0] is owner:
            return cached[1]
        if len(self._entries) >= self._size:
            self._entries.clear()
        value = make()
        self._entries[key] = (owner, value)
        return value
