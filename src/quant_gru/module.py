"""QuantGRU: nn.GRU's parameters and forward, plus the quantization switches of the product."""

from __future__ import annotations

import math
import numbers
import os
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from quant_gru import functional, quant_state
from quant_gru._report import report
from quant_gru.calibration.histogram import Histogram
from quant_gru.calibration.methods import (
    DEFAULT_METHOD,
    DEFAULT_PERCENTILE,
    METHODS,
    qparams_from_histogram,
)
from quant_gru.calibration.parameters import assemble_direction_quant
from quant_gru.calibration.statistics import CalibrationStatistics
from quant_gru.config import GRUQuantConfig
from quant_gru.export import aimet, quant_params
from quant_gru.kernels.backend import check_backend
from quant_gru.kernels.torch.quantized_forward import QuantizedModel, build_programs
from quant_gru.kernels.torch.stack import DirectionWeights, GRUShape
from quant_gru.quantize.params import DirectionQuant
from quant_gru.quantize.program import ACTIVATION_OPERATORS, build_constants


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
    calibrating: bool
    quant_config: GRUQuantConfig
    _statistics: CalibrationStatistics
    _calibration_method: str
    _export_format: str
    _export_mode: bool
    _backend: str
    _percentile_value: float

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
        self.calibrating = False
        self._export_mode = False
        self._export_format = "float"
        self._backend = "auto"
        self.quant_config = GRUQuantConfig.default()
        self._quantized: QuantizedModel | None = None
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
        # Histograms of every activation operator per (layer, direction), from calibration.
        # Not buffers: DistributedDataParallel would overwrite each rank's statistics with rank
        # 0's at every forward; finalize_calibration reduces them across ranks instead.
        self._statistics = CalibrationStatistics(self.num_layers * self.num_directions, device)
        self._calibration_method = DEFAULT_METHOD
        self._percentile_value = DEFAULT_PERCENTILE

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
        # Registered parameters straight from their dict (nn.Module.__getattr__ costs about a
        # microsecond a name on every call); getattr for names something else provides, such
        # as parametrizations or weight_norm's recomputed weights.
        parameters = self._parameters
        weights: list[Tensor] = []
        for name in self._flat_weights_names:
            registered = parameters.get(name)
            weights.append(getattr(self, name) if registered is None else registered)
        pairs: list[DirectionWeights] = []
        per_pair = 4 if self.bias else 2
        for start in range(0, len(weights), per_pair):
            w_ih, w_hh, *biases = weights[start : start + per_pair]
            b_ih, b_hh = biases if biases else (None, None)
            pairs.append((w_ih, w_hh, b_ih, b_hh))
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
        """Same signature and result as ``nn.GRU.forward``: ``(output, h_n)``.

        While ``calibrating`` it runs the float GRU and records the range of every operator.
        With ``use_quantization`` (and the config's ``disable_quantization`` false) it runs
        the integer model, dequantized; in training, gradients pass straight through.
        """
        weights, shape = self._direction_weights(), self._shape()
        if self.export_mode:
            if self._export_format == "qdq":
                return self._qdq_export_forward(input, hx)
            return functional.export_gru(input, hx, weights, shape)
        if self.calibrating:
            try:
                result = functional.gru(
                    input,
                    hx,
                    weights,
                    shape,
                    self.dropout,
                    self.training,
                    observe=self._statistics.hook,
                )
            except BaseException:
                self._statistics.discard_pending()
                raise
            self._statistics.flush()
            return result
        if self.use_quantization and not self.quant_config.disable_quantization:
            model = self._quantized_model()
            return functional.quantized_gru(
                input, hx, weights, shape, model, self.dropout, self.training, self._backend
            )
        return functional.gru(
            input, hx, weights, shape, self.dropout, self.training, backend=self._backend
        )

    @property
    def backend(self) -> str:
        """Which realization runs the float forward and the integer model's recurrence:
        'auto' (default: the persistent Triton kernels on CUDA where they apply, plain PyTorch
        otherwise; the environment variable QUANT_GRU_BACKEND overrides 'auto'), 'triton'
        (insist; RuntimeError saying why not) or 'torch'. Both give the same integer codes."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = check_backend(value)

    # --- export ----------------------------------------------------------------------------

    @property
    def export_format(self) -> str:
        """What forward computes while ``export_mode`` is on: 'float' (the float GRU as ATen's
        GRU operator, which ONNX export turns into the ONNX GRU operator with a dynamic
        sequence length) or 'qdq' (the calibrated quantized model, which ONNX export turns into
        a QuantizeLinear / DequantizeLinear pair at every operator, export/onnx_qdq.py)."""
        return self._export_format

    @export_format.setter
    def export_format(self, value: str) -> None:
        if value not in ("float", "qdq"):
            raise ValueError(f"export_format must be 'float' or 'qdq', got {value!r}")
        self._export_format = value
        self._finalize_for_export()

    @property
    def export_mode(self) -> bool:
        """Whether forward computes the traceable graph of ``export_format`` for ONNX export.
        Switching to QDQ export finalizes a pending calibration, since the exporter forbids
        forward to change the module's state."""
        return self._export_mode

    @export_mode.setter
    def export_mode(self, value: bool) -> None:
        self._export_mode = _check_bool("export_mode", value)
        self._finalize_for_export()

    def _finalize_for_export(self) -> None:
        qdq_export = self._export_mode and self._export_format == "qdq"
        if qdq_export and not self.is_calibrated() and self._has_statistics():
            self.finalize_calibration()

    def _qdq_export_forward(
        self, input: Tensor | PackedSequence, hx: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """The quantized forward as one traceable call whose ONNX export is the QDQ graph
        (export/qdq_trace.py)."""
        from quant_gru.export.onnx_qdq import NOT_CALIBRATED
        from quant_gru.export.qdq_trace import QDQExport, check_not_dynamo

        batched, batched_hx, unbatched = functional.export_qdq_input(
            input, hx, self._direction_weights(), self._shape()
        )
        check_not_dynamo()
        if not self.is_calibrated():
            # Setting export_mode / export_format finalized any collected statistics.
            raise RuntimeError(NOT_CALIBRATED)
        output, h_n = QDQExport.apply(batched, batched_hx, self)
        if unbatched:
            return output.squeeze(0 if self.batch_first else 1), h_n.squeeze(1)
        return output, h_n

    # --- quantization ----------------------------------------------------------------------

    @property
    def calibration_ranges(self) -> Tensor:
        """[min, max] seen so far of every activation operator, (L*D, 14, 2) float64 (CPU),
        operators in ACTIVATION_OPERATORS order; [+inf, -inf] where nothing was seen."""
        return self._statistics.ranges()

    @property
    def calibration_method(self) -> str:
        """How activation ranges are chosen from the statistics: 'sqnr' (default: least
        quantization noise), 'percentile' (clip both tails, see percentile_value) or 'minmax'."""
        return self._calibration_method

    @calibration_method.setter
    def calibration_method(self, method: str) -> None:
        if method not in METHODS:
            raise ValueError(
                f"calibration_method must be one of {', '.join(map(repr, METHODS))}, got {method!r}"
            )
        self._calibration_method = method
        self._parameters_stale()

    @property
    def percentile_value(self) -> float:
        """Percent of the values the 'percentile' method keeps (default 99.99)."""
        return self._percentile_value

    @percentile_value.setter
    def percentile_value(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 100:
            raise ValueError(f"percentile_value must be a number in (0, 100], got {value!r}")
        self._percentile_value = float(value)
        self._parameters_stale()

    def _parameters_stale(self) -> None:
        # Parameters computed from statistics are recomputed at the next quantized forward;
        # parameters loaded from a file, with no statistics behind them, stay.
        if self._statistics.is_complete:
            self._quantized = None

    def _quantized_model(self) -> QuantizedModel:
        if self._quantized is None:
            if not self._has_statistics():
                raise RuntimeError(
                    "QuantGRU is not calibrated: set model.calibrating = True, run forward on "
                    "calibration data, set model.calibrating = False (then optionally call "
                    "model.finalize_calibration()), before using use_quantization=True"
                )
            self.finalize_calibration()
        assert self._quantized is not None
        return self._quantized

    def _has_statistics(self) -> bool:
        return self._statistics.is_complete

    def is_calibrated(self) -> bool:
        """Whether quantization parameters are computed and in force."""
        return self._quantized is not None

    def reset_calibration(self) -> None:
        """Forget the collected statistics and the parameters computed from them."""
        self._statistics = CalibrationStatistics(len(self._pair_names), self._device())
        self._quantized = None

    def finalize_calibration(self, verbose: bool = False) -> None:
        """Compute the quantization parameters of every (layer, direction) from the collected
        statistics (with ``calibration_method``) and the current weights (max-abs, symmetric).

        Under torch.distributed the statistics of all ranks are merged first, so every rank
        gets the parameters one process would get from all the data. Both directions of a
        layer read the same input, so they share its ``input.x`` parameters
        (reference/README.md §8), computed from both directions' statistics.
        """
        histograms = self._statistics.reduced()
        if not all(not h.is_empty for row in histograms for h in row):
            raise RuntimeError(
                "no calibration statistics: set model.calibrating = True and run forward on "
                "calibration data first"
            )
        dirs, x_index = self.num_directions, ACTIVATION_OPERATORS.index("input.x")
        for layer in range(self.num_layers):
            rows = histograms[layer * dirs : (layer + 1) * dirs]
            shared = rows[0][x_index]
            for row in rows[1:]:
                shared = Histogram.merge(shared, row[x_index])
            for row in rows:
                row[x_index] = shared
        config, quant = self.quant_config, []
        for row, weights in zip(histograms, self._direction_weights(), strict=True):
            activations = {
                name: qparams_from_histogram(
                    hist,
                    config.spec(name),
                    config.scale_type,
                    self._calibration_method,
                    self._percentile_value,
                )
                for name, hist in zip(ACTIVATION_OPERATORS, row, strict=True)
            }
            quant.append(assemble_direction_quant(activations, weights, config))
        self._install(config, quant)
        report(
            verbose,
            f"QuantGRU calibrated ({self._calibration_method}): {len(quant)} "
            "(layer, direction) pairs",
        )

    def _install(self, config: GRUQuantConfig, quant: list[DirectionQuant]) -> None:
        """Put a config and its parameters in force (the integer constants are derived here)."""
        dirs = self.num_directions
        constants = []
        for index, weights in enumerate(self._direction_weights()):
            layer = index // dirs
            below = [q["output.h"] for q in quant[(layer - 1) * dirs : layer * dirs]]
            rows, input_size = weights[0].shape
            constants.append(
                build_constants(input_size, rows // 3, quant[index], config.scale_type, below)
            )
        self.quant_config = config
        self._quantized = QuantizedModel(quant, constants)

    def export_quant_params(
        self, path: str | os.PathLike[str], include_weights: bool = False, verbose: bool = False
    ) -> None:
        """Write the quantization parameters as JSON (written atomically: a crash never leaves
        a partial file). Calibrates from the collected statistics if not done yet."""
        model = self._quantized_model()
        programs = build_programs(model, self._direction_weights())
        doc = quant_params.document(
            self._model_info(),
            self.quant_config,
            model.quant,
            programs,
            self._pair_names,
            include_weights,
        )
        quant_params.write(path, doc)
        report(verbose, f"QuantGRU quantization parameters written to {os.fspath(path)}")

    def load_quant_params(self, path: str | os.PathLike[str], verbose: bool = False) -> None:
        """Load parameters written by export_quant_params (bit-width config included) into a
        module of the same shape; afterwards it produces the exporting module's codes. A file
        that is malformed or does not fit raises ``QuantParamsError`` and changes nothing."""
        config, quant = quant_params.read(path, self._model_info(), self._pair_names)
        self._install(config, quant)
        report(verbose, f"QuantGRU quantization parameters loaded from {os.fspath(path)}")

    def export_aimet_encodings(self, path: str | os.PathLike[str], verbose: bool = False) -> None:
        """Write the quantization grids as AIMET encodings (format 1.0.0), atomically."""
        model = self._quantized_model()
        doc = aimet.encodings(model.quant, self._pair_names, self.hidden_size, self.bias)
        quant_params.write(path, doc)
        report(verbose, f"QuantGRU AIMET encodings written to {os.fspath(path)}")

    def _model_info(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "bidirectional": self.bidirectional,
            "bias": self.bias,
        }

    @property
    def _pair_names(self) -> list[str]:
        """nn.GRU's names of the (layer, direction) pairs: l0, l0_reverse, l1, ..."""
        return [
            f"l{layer}{suffix}"
            for layer in range(self.num_layers)
            for suffix in self._direction_suffixes
        ]

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._quantized is not None:
            entries = quant_state.encode_state(
                self.quant_config, self._quantized.quant, self._pair_names
            )
            device = self._device()
            destination.update({prefix + k: v.to(device) for k, v in entries.items()})

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        ours = [k for k in unexpected_keys if k[len(prefix) :].startswith("quant_")]
        for key in ours:
            unexpected_keys.remove(key)
        if not quant_state.has_state(state_dict, prefix):
            return
        try:
            config, quant = quant_state.decode_state(
                state_dict, prefix, self._pair_names, self.hidden_size
            )
        except ValueError as error:
            error_msgs.append(f"quantization state of {type(self).__name__}: {error}")
            return
        self._install(config, quant)

    def load_bitwidth_config(self, path: str | os.PathLike[str], verbose: bool = False) -> None:
        """Load a bit-width config (JSON, the seed's format); invalid files raise
        ``QuantConfigError`` and leave the module unchanged. Computed parameters are
        recomputed from the statistics at the next quantized forward."""
        self._set_config(GRUQuantConfig.load(path), verbose, f"from {os.fspath(path)}")

    def set_all_bitwidth(
        self, bitwidth: int, is_symmetric: bool = True, verbose: bool = False
    ) -> None:
        """Every operator at `bitwidth` bits (weights and biases stay symmetric)."""
        config = self.quant_config.with_all_bitwidth(bitwidth, is_symmetric=is_symmetric)
        self._set_config(config, verbose, f"all operators at {bitwidth} bits")

    def _set_config(self, config: GRUQuantConfig, verbose: bool, origin: str) -> None:
        self.quant_config = config
        self._quantized = None
        report(verbose, f"QuantGRU bit-width config set ({origin})")

    def _apply(self, fn: Any, recurse: bool = True) -> QuantGRU:
        # Statistics follow the module's device whatever dtype it moves to.
        super()._apply(fn, recurse)
        self._statistics = self._statistics.to(self._device())
        return self

    def _device(self) -> torch.device:
        return next(self.parameters()).device

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
