"""Device copies of host constants (quantization scales, term constants), made once per host
tensor, device and type.

PyTorch synchronizes the stream to copy pageable host memory to a GPU, so each such copy waits
for every kernel already queued. The weights' programs are remade after every weight update
(in QAT, every training step), and copying their host constants again each time made the host
wait for the previous step's backward before it could queue the next forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quant_gru.kernels.derived import TensorCache

# A host tensor's copies by (device, type), dropped together when the tensor changes
# (derived.tensor_stamp) or goes.
_COPIES: TensorCache[dict[tuple[str, torch.dtype], Tensor]] = TensorCache()


def device_copy(
    tensor: Tensor, device: torch.device | str, dtype: torch.dtype | None = None
) -> Tensor:
    """``tensor.to(device, dtype)``; for a host tensor bound for another device, the copy made
    the first time (again after the host tensor changes). Tensors that require grad are copied
    every time (a cached copy would leave the graph)."""
    target = torch.device(device)
    dtype = tensor.dtype if dtype is None else dtype
    if (
        tensor.device.type != "cpu"
        or target.type == "cpu"
        or tensor.requires_grad
        or torch.compiler.is_compiling()
    ):
        return tensor.to(target, dtype)
    copies = _COPIES.get(tensor, dict)
    key = (str(target), dtype)
    copy = copies.get(key)
    if copy is None:
        copy = copies[key] = tensor.to(target, dtype)
    return copy
