"""QuantGRU as an nn.Module: parameters, initialisation, state_dict and conversions."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from quant_gru import QuantGRU

from tolerance import assert_float_conformant

CONFIGS = [
    dict(input_size=7, hidden_size=5),
    dict(input_size=7, hidden_size=5, num_layers=3, bidirectional=True, dropout=0.2),
    dict(input_size=3, hidden_size=37, num_layers=2, bias=False, batch_first=True),
]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_same_parameters_and_initialisation_as_nn_gru(kwargs: dict) -> None:
    torch.manual_seed(123)
    reference = nn.GRU(**kwargs)
    torch.manual_seed(123)
    model = QuantGRU(**kwargs)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    for name in theirs:
        assert ours[name].shape == theirs[name].shape, name
        assert torch.equal(ours[name], theirs[name]), name
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    assert [[p.shape for p in group] for group in model.all_weights] == [
        [p.shape for p in group] for group in reference.all_weights
    ]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_state_dict_loads_both_ways(kwargs: dict) -> None:
    reference, model = nn.GRU(**kwargs), QuantGRU(**kwargs)
    model.load_state_dict(reference.state_dict())  # strict: same keys, same shapes
    other = nn.GRU(**kwargs)
    other.load_state_dict(model.state_dict())
    for name, value in reference.state_dict().items():
        assert torch.equal(other.state_dict()[name], value)


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_from_float_and_to_float_round_trip(kwargs: dict) -> None:
    reference = nn.GRU(**kwargs).double().eval()
    model = QuantGRU.from_float(reference)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float64
    back = model.to_float()
    assert isinstance(back, nn.GRU) and not back.training
    x = torch.randn(4, 2, kwargs["input_size"], dtype=torch.float64)
    if kwargs.get("batch_first"):
        x = x.transpose(0, 1)
    expected, expected_h = reference(x)
    for candidate in (model, back):
        out, h = candidate(x)
        assert_float_conformant(out, expected, "output")
        assert_float_conformant(h, expected_h, "h_n")
    # Copies, not shared storage.
    with torch.no_grad():
        model.weight_hh_l0.add_(1.0)
    assert not torch.equal(model.weight_hh_l0, reference.weight_hh_l0)
    assert not torch.equal(model.weight_hh_l0, back.weight_hh_l0)


def test_from_float_rejects_other_modules() -> None:
    with pytest.raises(TypeError, match=r"expects a torch\.nn\.GRU, got LSTM"):
        QuantGRU.from_float(nn.LSTM(3, 4))  # type: ignore[arg-type]


def test_factory_kwargs() -> None:
    model = QuantGRU(3, 4, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in model.parameters())
    assert model(torch.randn(2, 1, 3, dtype=torch.float64))[0].dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_float_mode_tracks_float64(dtype: torch.dtype, device: torch.device) -> None:
    """bf16/fp16 run end to end; their error against float64 is that of their precision."""
    torch.manual_seed(0)
    model = QuantGRU(8, 16, num_layers=2).to(device, torch.float64)
    x = torch.randn(10, 3, 8, dtype=torch.float64, device=device)
    expected, _ = model(x)
    out, h = copy.deepcopy(model).to(dtype)(x.to(dtype))
    assert out.dtype == dtype and h.dtype == dtype
    error = (out.double() - expected).abs().max().item()
    # A few units of the format's rounding (2^-8 bf16, 2^-11 fp16) accumulated over 10 steps.
    assert error < 8 * torch.finfo(dtype).eps, error


def test_deepcopy_and_pickle_keep_weights() -> None:
    model = QuantGRU(3, 4, num_layers=2, bidirectional=True)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert repr(clone) == repr(model)
        for (name, a), (_, b) in zip(
            clone.state_dict().items(), model.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), name


def test_repr_names_the_hyper_parameters() -> None:
    model = QuantGRU(3, 4, num_layers=2, bias=False, batch_first=True, bidirectional=True)
    assert repr(model) == (
        "QuantGRU(3, 4, num_layers=2, bias=False, batch_first=True, bidirectional=True, "
        "use_quantization=False)"
    )


def test_quantized_forward_is_not_silently_float() -> None:
    model = QuantGRU(3, 4, use_quantization=True)
    assert model.use_quantization
    with pytest.raises(RuntimeError, match="not calibrated"):
        model(torch.randn(2, 1, 3))
