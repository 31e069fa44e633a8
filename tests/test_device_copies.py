"""device_copy: host constants copied to another device once, again after they change."""

from __future__ import annotations

import torch

from quant_gru.quantize.device_copies import device_copy

# The meta device stands for a GPU here: a copy to it is a real copy to another device.
OTHER = torch.device("meta")


def test_a_host_tensor_is_copied_once_per_device_and_type() -> None:
    scales = torch.tensor([0.5, 0.25], dtype=torch.float64)
    first = device_copy(scales, OTHER)
    assert first.device == OTHER and first.dtype == torch.float64
    assert device_copy(scales, OTHER) is first
    as_float = device_copy(scales, OTHER, torch.float32)
    assert as_float.dtype == torch.float32 and as_float is not first
    assert device_copy(scales, OTHER, torch.float32) is as_float


def test_a_changed_host_tensor_is_copied_again() -> None:
    scales = torch.tensor([0.5, 0.25])
    first = device_copy(scales, OTHER)
    scales.mul_(2)
    assert device_copy(scales, OTHER) is not first


def test_values_and_same_device_requests_match_to() -> None:
    scales = torch.tensor([3, 5])
    assert torch.equal(device_copy(scales, "cpu", torch.float64), scales.double())
    assert device_copy(scales, "cpu") is scales  # Tensor.to's own no-op


def test_tensors_that_require_grad_are_copied_every_time() -> None:
    learned = torch.tensor([0.5], requires_grad=True)
    first = device_copy(learned, OTHER)
    assert first.requires_grad and device_copy(learned, OTHER) is not first


def test_a_host_tensor_given_new_data_is_copied_again() -> None:
    scales = torch.tensor([0.5, 0.25])
    first = device_copy(scales, OTHER)
    scales.data = torch.tensor([4.0, 8.0])  # keeps the version counter
    assert device_copy(scales, OTHER) is not first


def test_inference_tensors_are_copied_every_time() -> None:
    with torch.inference_mode():
        scales = torch.tensor([0.5])
    assert device_copy(scales, OTHER) is not device_copy(scales, OTHER)


def test_copies_go_with_their_host_tensor() -> None:
    from quant_gru.quantize import device_copies

    scales = torch.tensor([0.5])
    before = len(device_copies._COPIES)
    device_copy(scales, OTHER)
    assert len(device_copies._COPIES) == before + 1
    del scales
    assert len(device_copies._COPIES) == before
