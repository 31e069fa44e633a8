"""Training, calibration and evaluation loops of the demo, with progress bars on stderr."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from quant_gru.demo.classifier import VowelClassifier, predictions
from quant_gru.demo.data import Utterances


def batches(data: Utterances, size: int, generator: torch.Generator | None) -> Iterator[Utterances]:
    """Mini-batches, shuffled when a generator is given."""
    order = (
        torch.randperm(len(data), generator=generator)
        if generator is not None
        else torch.arange(len(data))
    )
    for start in range(0, len(data), size):
        yield data.subset(order[start : start + size])


def train(
    model: VowelClassifier,
    data: Utterances,
    epochs: int,
    learning_rate: float,
    generator: torch.Generator,
    description: str,
) -> list[float]:
    """Adam with cross-entropy; returns the mean loss of each epoch."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    loss_fn = nn.CrossEntropyLoss()
    device = next(model.parameters()).device
    losses = []
    model.train()
    with tqdm(range(epochs), desc=description, unit="epoch", leave=False) as bar:
        for _ in bar:
            total, count = 0.0, 0
            for batch in batches(data, 32, generator):
                batch = batch.to(device)
                optimizer.zero_grad()
                loss = loss_fn(model(batch.features, batch.lengths), batch.labels)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
                count += len(batch)
            schedule.step()
            losses.append(total / count)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.eval()
    return losses


def calibrate(model: VowelClassifier, data: Utterances) -> None:
    """Collect the GRU's calibration statistics over ``data`` (float forward)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    model.gru.reset_calibration()
    model.gru.calibrating = True
    with torch.no_grad():
        for batch in tqdm(list(batches(data, 64, None)), desc="calibrate", leave=False):
            batch = batch.to(device)
            model(batch.features, batch.lengths)
    model.gru.calibrating = False


def accuracy(model: VowelClassifier, data: Utterances) -> float:
    """Percent of ``data`` classified correctly, in the module's current mode."""
    device = next(model.parameters()).device
    correct = 0
    model.eval()
    with torch.no_grad():
        for batch in batches(data, 128, None):
            batch = batch.to(device)
            correct += int(
                (predictions(model(batch.features, batch.lengths)) == batch.labels).sum()
            )
    return 100.0 * correct / len(data)
