"""Data-parallel calibration and QAT: 2 CPU processes (gloo) agree with one process."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp

from distributed_worker import (
    WORLD,
    batches,
    calibrate,
    make_model,
    qat_gradients,
    run,
    training_batch,
)


def test_two_ranks_calibrate_like_one_process_and_train_alike(tmp_path) -> None:
    mp.spawn(run, args=(str(tmp_path),), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    single = make_model()
    calibrate(single, batches())
    expected = {k: v for k, v in single.state_dict().items() if k.startswith("quant_")}
    for rank, result in enumerate(results):
        assert result["state"].keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(result["state"][key], value), f"rank {rank}: {key}"

    # DDP averages the ranks' gradients of their shard means: the gradient of the full mean.
    x, target = training_batch()
    want = qat_gradients(single.train(), x, target)
    for rank, result in enumerate(results):
        for name, grad in want.items():
            torch.testing.assert_close(
                result["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=f"rank {rank}: {name}"
            )
    assert os.path.exists(tmp_path / "rank1.pt")
