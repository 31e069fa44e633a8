"""The float GRU as ATen's own GRU operator, for ONNX export.

The classic exporter (``torch.onnx.export(..., dynamo=False)``) turns a Python time loop into
as many unrolled steps as the example input has, so a longer input would silently get a wrong
answer in ONNX Runtime. ATen's GRU operator exports to the ONNX ``GRU`` operator (gates
reordered, ``linear_before_reset=1``), whose sequence length stays dynamic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from quant_gru.kernels.torch.stack import DirectionWeights, GRUShape


def traceable_gru(
    input: Tensor, hx: Tensor | None, weights: Sequence[DirectionWeights], shape: GRUShape
) -> tuple[Tensor, Tensor]:
    """nn.GRU's inference forward on an already validated batched (3-D) or unbatched input."""
    unbatched = input.dim() == 2
    if unbatched:
        input = input.unsqueeze(0 if shape.batch_first else 1)
        hx = None if hx is None else hx.unsqueeze(1)
    batch = input.shape[0] if shape.batch_first else input.shape[1]
    if hx is None:
        states = shape.num_layers * shape.num_directions
        hx = input.new_zeros(states, batch, shape.hidden_size)
    has_bias = weights[0][2] is not None
    flat = [w for pair in weights for w in pair if w is not None]
    output, h_n = torch._VF.gru(
        input,
        hx,
        flat,
        has_bias,
        shape.num_layers,
        0.0,
        False,
        shape.bidirectional,
        shape.batch_first,
    )
    if unbatched:
        return output.squeeze(0 if shape.batch_first else 1), h_n.squeeze(1)
    return output, h_n
