"""Conversion between the input formats nn.GRU accepts and the one layout the kernels run on.

Every backend sees a time-major tensor (T, B, I), an initial state (L*D, B, H) and optional
per-sequence lengths. A PackedSequence is worked on in its own sorted batch order (longest
first), exactly as nn.GRU does, so hx is permuted in and h_n permuted back out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence


@dataclass(frozen=True)
class SequenceLayout:
    """How the caller's input was laid out, to give outputs back in the same form."""

    batch_first: bool
    unbatched: bool
    # Set for PackedSequence input only.
    batch_sizes: Tensor | None = None
    sorted_indices: Tensor | None = None
    unsorted_indices: Tensor | None = None
    packed_rows: Tensor | None = None  # rows of the flattened (T*B) grid that hold data

    @property
    def is_packed(self) -> bool:
        return self.batch_sizes is not None


def packed_to_time_major(packed: PackedSequence) -> tuple[Tensor, Tensor, SequenceLayout]:
    """Scatter a PackedSequence into a zero-padded (T, B, I) tensor in sorted batch order."""
    batch_sizes = packed.batch_sizes
    steps, batch = len(batch_sizes), int(batch_sizes[0])
    # At step t the sequences 0..batch_sizes[t]-1 (sorted order) are present: a (T, B) mask
    # whose True cells, read row by row, are the packed rows in their stored order.
    present = torch.arange(batch).unsqueeze(0) < batch_sizes.unsqueeze(1)
    rows = present.flatten().nonzero().squeeze(1).to(packed.data.device)
    padded = packed.data.new_zeros(steps * batch, packed.data.shape[-1])
    padded = padded.index_copy(0, rows, packed.data).view(steps, batch, -1)
    lengths = present.sum(0).to(packed.data.device)
    layout = SequenceLayout(
        batch_first=False,
        unbatched=False,
        batch_sizes=batch_sizes,
        sorted_indices=packed.sorted_indices,
        unsorted_indices=packed.unsorted_indices,
        packed_rows=rows,
    )
    return padded, lengths, layout


def tensor_to_time_major(x: Tensor, batch_first: bool) -> tuple[Tensor, SequenceLayout]:
    """(B, T, I), (T, B, I) or unbatched (T, I) to (T, B, I)."""
    if x.dim() == 2:
        return x.unsqueeze(1), SequenceLayout(batch_first=batch_first, unbatched=True)
    if batch_first:
        x = x.transpose(0, 1)
    return x, SequenceLayout(batch_first=batch_first, unbatched=False)


def hidden_to_working_order(hx: Tensor, layout: SequenceLayout) -> Tensor:
    """The caller's hx ((L*D, B, H), or (L*D, H) unbatched) in the kernels' batch order."""
    if layout.unbatched:
        return hx.unsqueeze(1)
    if layout.sorted_indices is not None:
        return hx.index_select(1, layout.sorted_indices)
    return hx


def output_from_time_major(out: Tensor, layout: SequenceLayout) -> Tensor | PackedSequence:
    """(T, B, D*H) back to the caller's format."""
    if layout.is_packed:
        assert layout.packed_rows is not None
        data = out.reshape(-1, out.shape[-1]).index_select(0, layout.packed_rows)
        return PackedSequence(
            data, layout.batch_sizes, layout.sorted_indices, layout.unsorted_indices
        )
    if layout.unbatched:
        return out.squeeze(1)
    return out.transpose(0, 1) if layout.batch_first else out


def hidden_from_working_order(h_n: Tensor, layout: SequenceLayout) -> Tensor:
    """(L*D, B, H) back to the caller's batch order and rank."""
    if layout.unbatched:
        return h_n.squeeze(1)
    if layout.unsorted_indices is not None:
        return h_n.index_select(1, layout.unsorted_indices)
    return h_n
