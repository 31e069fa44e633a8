"""The command line's files: the model and data it reads, the paths it writes. Every failure
is a ``CLIError`` naming the path, what was expected and what was found."""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quant_gru._files import atomic_write_text
from quant_gru.cli.errors import CLIError
from quant_gru.export.quant_params import QuantParamsError
from quant_gru.module import QuantGRU

DATA_SUFFIXES = (".pt", ".pth", ".npy")
_LAYER_KEY = re.compile(r"weight_ih_l(\d+)$")


def _existing_file(path: str | os.PathLike[str], what: str) -> Path:
    file = Path(path)
    if not file.exists():
        raise CLIError(f"{what} {file}: no such file")
    if not file.is_file():
        raise CLIError(f"{what} {file}: expected a file, found a directory or special file")
    return file


def load_model(path: str | os.PathLike[str], batch_first: bool) -> QuantGRU:
    """A QuantGRU with the weights (and any quantization state) of a ``torch.save``d state_dict
    of an ``nn.GRU`` or a ``QuantGRU``; its hyper-parameters are read off the weight shapes."""
    file = _existing_file(path, "model file")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling fails in many types; all mean "not a state_dict"
        raise CLIError(
            f"model file {file}: expected a torch.save'd state_dict of an nn.GRU or QuantGRU "
            f"(save module.state_dict(), not the module), could not load it ({_reason(error)})"
        ) from None
    if not isinstance(state, Mapping):
        raise CLIError(
            f"model file {file}: expected a state_dict (a dict of tensors), "
            f"found a {type(state).__name__}"
        )
    shape = _hyper_parameters(state, file)
    model = QuantGRU(**shape, batch_first=batch_first)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CLIError(f"model file {file}: does not fit a GRU of {shape}: {error}") from None
    return model.eval()


def load_params(model: QuantGRU, path: str | None, option: str) -> None:
    """Put a quant-params file in force; without one (``path`` None) the model must carry its
    own (a calibrated QuantGRU's state_dict)."""
    if path is None:
        if model.is_calibrated():
            return
        raise CLIError(
            f"{option} QP.json is required: the model file carries no quantization parameters "
            "(write them with 'quant-gru calibrate')"
        )
    try:
        model.load_quant_params(path)
    except FileNotFoundError:
        raise CLIError(f"{option} {path}: no such file") from None
    except QuantParamsError as error:
        raise CLIError(f"{option}: {error}") from None
    except UnicodeDecodeError as error:
        raise CLIError(f"{option} {path}: expected a UTF-8 JSON file ({error.reason})") from None
    except OSError as error:
        raise CLIError(f"{option} {path}: cannot read it ({error.strerror})") from None


def describe(model: QuantGRU) -> str:
    """``2-layer bidirectional GRU (I=6, H=16)``."""
    kind = "bidirectional GRU" if model.bidirectional else "GRU"
    return f"{model.num_layers}-layer {kind} (I={model.input_size}, H={model.hidden_size})"


def _hyper_parameters(state: Mapping[str, Any], file: Path) -> dict[str, Any]:
    if "weight_ih_l0" not in state:
        prefixed = sorted(k for k in state if isinstance(k, str) and k.endswith(".weight_ih_l0"))
        hint = (
            f"; found {prefixed[0]!r}: save the GRU's own state_dict (gru.state_dict())"
            if prefixed
            else ""
        )
        raise CLIError(
            f"model file {file}: expected an nn.GRU state_dict with key 'weight_ih_l0', "
            f"found keys {_preview(state)}{hint}"
        )
    w_ih, w_hh = state.get("weight_ih_l0"), state.get("weight_hh_l0")
    if not (isinstance(w_ih, torch.Tensor) and isinstance(w_hh, torch.Tensor)):
        raise CLIError(
            f"model file {file}: expected tensors 'weight_ih_l0' and 'weight_hh_l0', found "
            f"{type(w_ih).__name__} and {type(w_hh).__name__}"
        )
    hidden = w_hh.shape[1] if w_hh.dim() == 2 else -1
    if w_ih.dim() != 2 or w_hh.dim() != 2 or w_ih.shape[0] != 3 * hidden:
        raise CLIError(
            f"model file {file}: expected GRU weights weight_ih_l0 (3*H, I) and weight_hh_l0 "
            f"(3*H, H), found {tuple(w_ih.shape)} and {tuple(w_hh.shape)} "
            "(an LSTM has 4*H rows)"
        )
    layers = sorted(int(m.group(1)) for k in state if (m := _LAYER_KEY.fullmatch(str(k))))
    if layers != list(range(len(layers))):
        raise CLIError(
            f"model file {file}: expected layers weight_ih_l0 ... weight_ih_l{len(layers) - 1}, "
            f"found layers {layers}"
        )
    return {
        "input_size": w_ih.shape[1],
        "hidden_size": hidden,
        "num_layers": len(layers),
        "bidirectional": "weight_ih_l0_reverse" in state,
        "bias": "bias_ih_l0" in state,
    }


def _reason(error: Exception, limit: int = 160) -> str:
    """The first line of an error, shortened: torch.load's messages run to paragraphs."""
    if isinstance(error, pickle.UnpicklingError):  # torch.load's weights-only refusal
        return "torch.load(weights_only=True) refused it: not only tensors and plain containers"
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _preview(state: Mapping[Any, Any], count: int = 5) -> str:
    keys = [str(k) for k in list(state)[:count]]
    more = f", ... ({len(state)} in all)" if len(state) > count else ""
    return f"[{', '.join(keys)}{more}]" if keys else "[] (an empty dict)"


def load_data(path: str | os.PathLike[str]) -> torch.Tensor:
    """A float32 tensor, 3-D (a batch) or 2-D (one unbatched sequence), from a ``.pt`` file
    (``torch.save`` of a tensor) or a ``.npy`` file."""
    file = _existing_file(path, "data file")
    suffix = file.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise CLIError(
            f"data file {file}: expected a {', '.join(DATA_SUFFIXES)} file, found suffix "
            f"{suffix or '(none)'!r}"
        )
    try:
        if suffix == ".npy":
            data: Any = torch.from_numpy(np.load(file, allow_pickle=False))
        else:
            data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # unreadable or not this format
        raise CLIError(
            f"data file {file}: could not load it as {suffix} ({_reason(error)})"
        ) from None
    if not isinstance(data, torch.Tensor):
        raise CLIError(f"data file {file}: expected a tensor, found a {type(data).__name__}")
    if not data.is_floating_point():
        raise CLIError(f"data file {file}: expected floating-point values, found {data.dtype}")
    if data.dim() not in (2, 3) or data.numel() == 0:
        raise CLIError(
            f"data file {file}: expected a non-empty 3-D (batch) or 2-D (one sequence) tensor, "
            f"found shape {tuple(data.shape)}"
        )
    data = data.to(torch.float32).contiguous()
    bad = int((~torch.isfinite(data)).sum())
    if bad:
        raise CLIError(f"data file {file}: expected finite values, found {bad} NaN or inf")
    return data


def check_features(data: torch.Tensor, model: QuantGRU, path: str | os.PathLike[str]) -> None:
    """The data's last dimension must be the model's input_size."""
    if data.shape[-1] != model.input_size:
        raise CLIError(
            f"data file {os.fspath(path)}: expected {model.input_size} features in the last "
            f"dimension (the model's input_size), found {data.shape[-1]} "
            f"(shape {tuple(data.shape)})"
        )


def batched(data: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """3-D data as it is; one unbatched sequence (T, I) as a batch of one."""
    if data.dim() == 3:
        return data
    return data.unsqueeze(0 if batch_first else 1)


def sequences_and_steps(data: torch.Tensor, batch_first: bool) -> tuple[int, int]:
    """(batch, steps) of 3-D data in either layout."""
    batch_axis = 0 if batch_first else 1
    return data.shape[batch_axis], data.shape[1 - batch_axis]


def output_path(path: str | os.PathLike[str], option: str) -> Path:
    """A path to write, checked before any work: its directory must exist."""
    file = Path(path)
    if file.is_dir():
        raise CLIError(f"{option} {file}: expected a file path, found a directory")
    if not file.parent.is_dir():
        raise CLIError(f"{option} {file}: directory {file.parent} does not exist")
    return file


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    """Strict JSON (no NaN or Infinity literals), written atomically."""
    atomic_write_text(path, json.dumps(document, indent=2, allow_nan=False) + "\n")
