"""The demo's model: a QuantGRU over the frames, a linear layer on its last hidden state."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from quant_gru import QuantGRU
from quant_gru.demo.data import CLASSES, FEATURES


class VowelClassifier(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.gru = QuantGRU(FEATURES, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, CLASSES)

    def forward(self, features: Tensor, lengths: Tensor) -> Tensor:
        """Logits (N, 9) of padded batch-first features, run as packed sequences."""
        packed = pack_padded_sequence(
            features, lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        _, h_n = self.gru(packed)
        return self.head(h_n[-1])

    def head_on_outputs(self, outputs: Tensor, lengths: Tensor) -> Tensor:
        """Logits from the GRU's padded outputs (N, T, H): the output at each sequence's last
        frame, which for a one-directional GRU is its final state whatever follows it (how
        an ONNX graph without sequence lengths gives the same answer)."""
        last = (lengths - 1).to(outputs.device).view(-1, 1, 1).expand(-1, 1, outputs.shape[-1])
        return self.head(outputs.gather(1, last).squeeze(1))


def predictions(logits: Tensor) -> Tensor:
    return torch.argmax(logits, dim=-1)
