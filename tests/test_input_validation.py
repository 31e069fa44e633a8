"""Bad input: the same exception type as nn.GRU, with a message saying expected and actual."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from quant_gru import QuantGRU


def raises_like_nn_gru(make_call, expected_type: type[Exception], *fragments: str) -> None:
    """Both modules raise `expected_type`; ours names every fragment in its message."""
    reference = nn.GRU(10, 20, num_layers=2)
    model = QuantGRU(10, 20, num_layers=2)
    with pytest.raises(expected_type):
        make_call(reference)
    with pytest.raises(expected_type) as caught:
        make_call(model)
    for fragment in fragments:
        assert fragment in str(caught.value), f"{fragment!r} not in {caught.value}"


FORWARD_ERRORS = {
    "wrong feature size": (
        lambda m: m(torch.randn(5, 3, 7)),
        RuntimeError,
        ("Expected 10", "got 7"),
    ),
    "wrong hx shape": (
        lambda m: m(torch.randn(5, 3, 10), torch.randn(1, 3, 20)),
        RuntimeError,
        ("(2, 3, 20)", "[1, 3, 20]"),
    ),
    "wrong hx batch": (
        lambda m: m(torch.randn(5, 3, 10), torch.randn(2, 4, 20)),
        RuntimeError,
        ("(2, 3, 20)", "[2, 4, 20]"),
    ),
    "2-D hx for batched input": (
        lambda m: m(torch.randn(5, 3, 10), torch.randn(2, 20)),
        RuntimeError,
        ("3-D", "2-D"),
    ),
    "3-D hx for unbatched input": (
        lambda m: m(torch.randn(5, 10), torch.randn(2, 1, 20)),
        RuntimeError,
        ("2-D", "3-D"),
    ),
    "wrong unbatched hx shape": (
        lambda m: m(torch.randn(5, 10), torch.randn(3, 20)),
        RuntimeError,
        ("(2, 20)", "[3, 20]"),
    ),
    "1-D input": (lambda m: m(torch.randn(10)), ValueError, ("2D or 3D", "1D")),
    "4-D input": (lambda m: m(torch.randn(2, 5, 3, 10)), ValueError, ("2D or 3D", "4D")),
    "input dtype differs from weights": (
        lambda m: m(torch.randn(5, 3, 10, dtype=torch.float64)),
        ValueError,
        ("torch.float64", "torch.float32"),
    ),
    "integer input": (
        lambda m: m(torch.ones(5, 3, 10, dtype=torch.int32)),
        ValueError,
        ("torch.int32", "torch.float32"),
    ),
    "hx dtype differs from input": (
        lambda m: m(torch.randn(5, 3, 10), torch.randn(2, 3, 20, dtype=torch.float64)),
        RuntimeError,
        ("torch.float64", "torch.float32"),
    ),
    "empty sequence": (
        lambda m: m(torch.randn(0, 3, 10)),
        RuntimeError,
        ("larger than 0", "got 0"),
    ),
    "packed input with wrong hx batch": (
        lambda m: m(
            pack_padded_sequence(
                torch.randn(5, 3, 10), torch.tensor([5, 2, 4]), enforce_sorted=False
            ),
            torch.randn(2, 2, 20),
        ),
        RuntimeError,
        ("(2, 3, 20)", "[2, 2, 20]"),
    ),
}


@pytest.mark.parametrize("name", list(FORWARD_ERRORS))
def test_forward_errors(name: str) -> None:
    call, expected_type, fragments = FORWARD_ERRORS[name]
    raises_like_nn_gru(call, expected_type, *fragments)


CONSTRUCTOR_ERRORS = {
    "num_layers zero": (dict(num_layers=0), ValueError, ("num_layers", "greater than zero", "0")),
    "num_layers negative": (dict(num_layers=-1), ValueError, ("num_layers", "-1")),
    "num_layers float": (dict(num_layers=1.5), TypeError, ("num_layers", "float")),
    "dropout above 1": (dict(num_layers=2, dropout=1.5), ValueError, ("[0, 1]", "1.5")),
    "dropout below 0": (dict(num_layers=2, dropout=-0.1), ValueError, ("[0, 1]", "-0.1")),
    "dropout bool": (dict(num_layers=2, dropout=True), ValueError, ("[0, 1]", "True")),
    "input_size float": (dict(input_size=10.0), TypeError, ("input_size", "int", "float")),
    "hidden_size float": (dict(hidden_size=20.0), TypeError, ("hidden_size", "int", "float")),
    "hidden_size zero": (dict(hidden_size=0), ValueError, ("hidden_size", "0")),
    "input_size zero": (dict(input_size=0), ValueError, ("input_size", "0")),
    "bias not bool": (dict(bias=1), TypeError, ("bias", "bool", "int")),
    "batch_first not bool": (dict(batch_first="yes"), TypeError, ("batch_first", "str")),
}


@pytest.mark.parametrize("name", list(CONSTRUCTOR_ERRORS))
def test_constructor_errors(name: str) -> None:
    overrides, expected_type, fragments = CONSTRUCTOR_ERRORS[name]
    kwargs = {"input_size": 10, "hidden_size": 20, **overrides}
    with pytest.raises(expected_type):
        nn.GRU(**kwargs)
    with pytest.raises(expected_type) as caught:
        QuantGRU(**kwargs)
    for fragment in fragments:
        assert fragment in str(caught.value), f"{fragment!r} not in {caught.value}"


def test_use_quantization_must_be_bool() -> None:
    with pytest.raises(TypeError, match=re.escape("use_quantization should be of type bool")):
        QuantGRU(4, 4, use_quantization="yes")  # type: ignore[arg-type]


def test_dropout_with_one_layer_warns_like_nn_gru() -> None:
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        QuantGRU(4, 4, num_layers=1, dropout=0.5)


def test_non_tensor_input_and_hx() -> None:
    model = QuantGRU(3, 4)
    with pytest.raises(TypeError, match="Tensor or a PackedSequence, got list"):
        model([[1.0, 2.0, 3.0]])
    with pytest.raises(TypeError, match="hx to be a Tensor or None, got list"):
        model(torch.randn(2, 1, 3), [0.0])


def test_weights_on_other_device_than_input() -> None:
    model = QuantGRU(3, 4).to(torch.device("meta"))
    with pytest.raises(RuntimeError, match="on cpu but the weights are on meta"):
        model(torch.randn(2, 1, 3))
