"""The Japanese Vowels dataset (UCI; bundled with the ``aeon`` package and read offline by its
own loader): nine speakers uttering /ae/, 12 LPC cepstral coefficients per frame, 7 to 29
frames per utterance; 270 training and 370 test utterances."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

FEATURES = 12
CLASSES = 9


@dataclass(frozen=True)
class Utterances:
    """Padded batch-first features (N, T_max, 12), lengths (N,) and labels (N,) in 0..8."""

    features: Tensor
    lengths: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: Tensor) -> Utterances:
        lengths = self.lengths[index]
        steps = int(lengths.max()) if len(lengths) else 0
        return Utterances(self.features[index, :steps], lengths, self.labels[index])

    def to(self, device: torch.device) -> Utterances:
        return Utterances(self.features.to(device), self.lengths.to(device), self.labels.to(device))


def load_japanese_vowels() -> tuple[Utterances, Utterances]:
    """(train, test), features standardized with the training set's mean and deviation."""
    try:
        from aeon.datasets import load_classification
    except ImportError as error:
        raise ImportError(
            "the demo reads its dataset with the aeon package: "
            "pip install 'quant-gru[demo]' (aeon, matplotlib, tqdm, onnx, onnxruntime)"
        ) from error
    splits = [load_classification("JapaneseVowels", split=split) for split in ("train", "test")]
    train, test = (_utterances(series, labels) for series, labels in splits)
    frames = torch.cat([train.features[i, : int(n)] for i, n in enumerate(train.lengths)])
    mean, deviation = frames.mean(dim=0), frames.std(dim=0)
    return _standardized(train, mean, deviation), _standardized(test, mean, deviation)


def _utterances(series: Sequence[np.ndarray], labels: Sequence[object]) -> Utterances:
    lengths = torch.tensor([s.shape[1] for s in series])
    features = torch.zeros(len(series), int(lengths.max()), FEATURES)
    for i, s in enumerate(series):
        if s.shape[0] != FEATURES:
            raise ValueError(f"expected {FEATURES} coefficients per frame, got {s.shape[0]}")
        features[i, : s.shape[1]] = torch.as_tensor(s.T, dtype=torch.float32)
    classes = torch.tensor([int(str(label)) - 1 for label in labels])
    return Utterances(features, lengths, classes)


def _standardized(data: Utterances, mean: Tensor, deviation: Tensor) -> Utterances:
    steps = torch.arange(data.features.shape[1]).view(1, -1, 1)
    valid = steps < data.lengths.view(-1, 1, 1)
    features = torch.where(valid, (data.features - mean) / deviation, 0.0)
    return Utterances(features, data.lengths, data.labels)
