"""Device copies of host constants (quantization scales, term constants), made once per host
tensor, device and type.

PyTorch synchronizes the stream to copy pageable host memory to a GPU, so each such copy waits
for every kernel already queued. The weights' programs are remade after every weight update
(in QAT, every training step), and copying their host constants again each time made the host
wait for the previous step's backward before it could queue the next forward.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

# By id of the host tensor: its weak reference (the entry goes when the tensor does) and its
# copies by (device, type) with the tensor's version when each was made. (Not a
# WeakKeyDictionary: that compares keys with ==, which tensors answer elementwise.)
_Copies = dict[tuple[str, torch.dtype], tuple[int, Tensor]]
_COPIES: dict[int, tuple[weakref.ref[Tensor], _Copies]] = {}


def device_copy(
    tensor: Tensor, device: torch.device | str, dtype: torch.dtype | None = None
) -> Tensor:
    """``tensor.to(device, dtype)``; for a host tensor bound for another device, the copy made
    the first time (again after the host tensor changes in place). Tensors that require grad
    are copied every time (a cached copy would leave the graph)."""
    target = torch.device(device)
    dtype = tensor.dtype if dtype is None else dtype
    if (
        tensor.device.type != "cpu"
        or target.type == "cpu"
        or tensor.requires_grad
        or torch.compiler.is_compiling()
    ):
        return tensor.to(target, dtype)
    copies = _copies_of(tensor)
    key = (str(target), dtype)
    cached = copies.get(key)
    if cached is not None and cached[0] == tensor._version:
        return cached[1]
    copy = tensor.to(target, dtype)
    copies[key] = (tensor._version, copy)
    return copy


def _copies_of(tensor: Tensor) -> _Copies:
    key = id(tensor)
    entry = _COPIES.get(key)
    if entry is None or entry[0]() is not tensor:

        def forget(reference: weakref.ref[Tensor]) -> None:
            if key in _COPIES and _COPIES[key][0] is reference:
                del _COPIES[key]

        entry = (weakref.ref(tensor, forget), {})
        _COPIES[key] = entry
    return entry[1]
