"""Worker of tests/test_distributed.py: one rank of a 2-process gloo group (spawned)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from quant_gru import QuantGRU

WORLD = 2


def make_model() -> QuantGRU:
    torch.manual_seed(0)
    model = QuantGRU(5, 7, num_layers=2, bidirectional=True)
    model.set_all_bitwidth(6, is_symmetric=False)
    return model


def batches() -> list[torch.Tensor]:
    """Calibration data; rank r gets batches r, r + 2, ... Their ranges differ on purpose."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(6, 4, 5, generator=generator) * (1 + i) for i in range(4)]


def training_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(6, 8, 5, generator=generator), torch.randn(6, 8, 14, generator=generator)


def calibrate(model: QuantGRU, data: list[torch.Tensor]) -> None:
    model.calibrating = True
    with torch.no_grad():
        for batch in data:
            model(batch)
    model.calibrating = False
    model.use_quantization = True
    model.finalize_calibration()


def qat_gradients(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict:
    out, _ = model(x)
    torch.nn.functional.mse_loss(out, target).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def run(rank: int, folder: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD
    )
    try:
        model = make_model()
        calibrate(model, batches()[rank::WORLD])
        state = {k: v for k, v in model.state_dict().items() if k.startswith("quant_")}
        x, target = training_batch()
        shard = slice(rank * 4, (rank + 1) * 4)
        wrapped = DistributedDataParallel(model.train())
        grads = qat_gradients(wrapped, x[:, shard], target[:, shard])
        grads = {k.removeprefix("module."): v for k, v in grads.items()}
        torch.save({"state": state, "grads": grads}, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
