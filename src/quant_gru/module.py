"""QuantGRU: nn.GRU's parameters and forward, plus the quantization switches of the product."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from quant_gru import functional
from quant_gru.functional import DirectionWeights, GRUShape


def _check_positive_int(name: str, value: object) -> int:
    # bool is an int to Python and to nn.GRU; keep nn.GRU's leniency there.
    if not isinstance(value, int):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be greater than zero, got {value}")
    return value


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
    return value


def _hyper_parameters(gru: nn.Module) -> dict[str, Any]:
    """Constructor arguments shared by nn.GRU and QuantGRU, read from either (same names)."""
    reference = next(gru.parameters())
    names = (
        "input_size",
        "hidden_size",
        "num_layers",
        "bias",
        "batch_first",
        "dropout",
        "bidirectional",
    )
    return {
        **{name: getattr(gru, name) for name in names},
        "device": reference.device,
        "dtype": reference.dtype,
    }


class QuantGRU(nn.Module):
    """A drop-in replacement for :class:`torch.nn.GRU`.

    With ``use_quantization=False`` (the default) it computes exactly what ``nn.GRU`` computes,
    with the same parameters, initialisation and ``state_dict`` keys, so weights load both ways
    (see :meth:`from_float` and :meth:`to_float`). Inputs are taken as ``nn.GRU`` takes them:
    batched 3-D (``batch_first`` either way), unbatched 2-D, or a ``PackedSequence``.
    """

    input_size: int
    hidden_size: int
    num_layers: int
    bias: bool
    batch_first: bool
    bidirectional: bool
    dropout: float
    use_quantization: bool

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        use_quantization: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.input_size = _check_positive_int("input_size", input_size)
        self.hidden_size = _check_positive_int("hidden_size", hidden_size)
        self.num_layers = _check_positive_int("num_layers", num_layers)
        self.bias = _check_bool("bias", bias)
        self.batch_first = _check_bool("batch_first", batch_first)
        self.bidirectional = _check_bool("bidirectional", bidirectional)
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, numbers.Real)
            or not 0 <= dropout <= 1
        ):
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the probability of an "
                f"element being zeroed, got {dropout!r}"
            )
        self.dropout = float(dropout)
        if self.dropout > 0 and self.num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero "
                f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
                f"num_layers={num_layers}",
                stacklevel=2,
            )
        self.use_quantization = _check_bool("use_quantization", use_quantization)
        self.proj_size = 0  # nn.GRU has no projection; kept for code that reads the attribute

        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        gate_size = 3 * hidden_size
        self._flat_weights_names: list[str] = []
        for layer in range(num_layers):
            layer_input_size = input_size if layer == 0 else hidden_size * self.num_directions
            for suffix in self._direction_suffixes:
                shapes = {
                    f"weight_ih_l{layer}{suffix}": (gate_size, layer_input_size),
                    f"weight_hh_l{layer}{suffix}": (gate_size, hidden_size),
                }
                if bias:
                    shapes[f"bias_ih_l{layer}{suffix}"] = (gate_size,)
                    shapes[f"bias_hh_l{layer}{suffix}"] = (gate_size,)
                for name, shape in shapes.items():
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
                    self._flat_weights_names.append(name)
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def _direction_suffixes(self) -> tuple[str, ...]:
        return ("", "_reverse") if self.bidirectional else ("",)

    def reset_parameters(self) -> None:
        """nn.GRU's initialisation, drawn in the same order: U(-1/sqrt(H), 1/sqrt(H))."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def flatten_parameters(self) -> None:
        """No-op, for code written against nn.GRU (which compacts weights for cuDNN)."""

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """Parameters grouped per (layer, direction), in nn.GRU's order."""
        per_pair = 4 if self.bias else 2
        names = self._flat_weights_names
        return [
            [getattr(self, name) for name in names[start : start + per_pair]]
            for start in range(0, len(names), per_pair)
        ]

    def _direction_weights(self) -> list[DirectionWeights]:
        pairs: list[DirectionWeights] = []
        for layer in range(self.num_layers):
            for suffix in self._direction_suffixes:
                pairs.append(
                    (
                        getattr(self, f"weight_ih_l{layer}{suffix}"),
                        getattr(self, f"weight_hh_l{layer}{suffix}"),
                        getattr(self, f"bias_ih_l{layer}{suffix}") if self.bias else None,
                        getattr(self, f"bias_hh_l{layer}{suffix}") if self.bias else None,
                    )
                )
        return pairs

    def _shape(self) -> GRUShape:
        return GRUShape(
            input_size=self.input_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            batch_first=self.batch_first,
        )

    def forward(
        self, input: Tensor | PackedSequence, hx: Tensor | None = None
    ) -> tuple[Tensor | PackedSequence, Tensor]:
        """Same signature and result as ``nn.GRU.forward``: ``(output, h_n)``."""
        if self.use_quantization:
            raise NotImplementedError(
                "use_quantization=True: the quantized GRU is not available in this version; "
                "set use_quantization=False to run the float GRU"
            )
        return functional.gru(
            input,
            hx,
            self._direction_weights(),
            self._shape(),
            dropout=self.dropout,
            training=self.training,
        )

    @classmethod
    def from_float(cls, gru: nn.GRU, use_quantization: bool = False) -> QuantGRU:
        """A QuantGRU with ``gru``'s hyper-parameters and a copy of its weights."""
        if not isinstance(gru, nn.GRU):
            raise TypeError(f"from_float expects a torch.nn.GRU, got {type(gru).__name__}")
        if gru.proj_size != 0:
            raise ValueError(f"nn.GRU has no projections; got proj_size={gru.proj_size}")
        model = cls(**_hyper_parameters(gru), use_quantization=use_quantization)
        model.load_state_dict(gru.state_dict())
        model.train(gru.training)
        return model

    def to_float(self) -> nn.GRU:
        """An ``nn.GRU`` with this module's hyper-parameters and a copy of its float weights."""
        with warnings.catch_warnings():
            # The dropout/num_layers warning was already given when this module was built.
            warnings.simplefilter("ignore", UserWarning)
            gru = nn.GRU(**_hyper_parameters(self))
        gru.load_state_dict(
            {name: getattr(self, name).detach() for name in self._flat_weights_names}
        )
        gru.train(self.training)
        return gru

    def extra_repr(self) -> str:
        parts = [f"{self.input_size}, {self.hidden_size}"]
        if self.num_layers != 1:
            parts.append(f"num_layers={self.num_layers}")
        if not self.bias:
            parts.append("bias=False")
        if self.batch_first:
            parts.append("batch_first=True")
        if self.dropout != 0:
            parts.append(f"dropout={self.dropout}")
        if self.bidirectional:
            parts.append("bidirectional=True")
        parts.append(f"use_quantization={self.use_quantization}")
        return ", ".join(parts)
