"""What the integer kernels save for QAT's backward (integer_kernel.py and
integer_row_kernel.py with SAVE), and the constants they need for it.

QAT's gradients are the float GRU's, evaluated at the dequantized codes of every operator, with
each quantization point's gradient blocked where the point's float value rounds outside its
code range (kernels/torch/quantized_forward.py). Per step the forward kernel holds every code,
so it computes those float values itself, in the model's type, in the order of operations of
that graph (decomposed_gru.py; matmul.Rh's from its exact integer sum, which a float product
only approximates), and folds the masks and the float functions' derivatives into five
coefficients a unit, from which the backward (gru_backward.py with QAT) has one step's gradients:

    a     = dh (the gradient of h_t)
    dz^   = a Ez        (gate.z_pre's gradient)
    dg^   = a Eg        (gate.g_pre's)
    dr^   = dg^ Er      (gate.r_pre's)
    drb_n = dg^ En      (op.Rh_add_br's n part, before its own mask)
    dh_{t-1} = a P + (matmul.Rh's gradient) R

with P = m_h m_old z, Ez = m_zpre m_zout σ'(z^) (m_h m_old h - m_h m_new g),
Eg = m_gpre m_gout (1 - tanh²(g^)) m_h m_new (1 - z), Er = m_rpre m_rout σ'(r^) m_rRh rb_n,
En = m_rRh r; and a byte of six masks a unit: op.Rh_add_br's (bits 0-2) and matmul.Rh's
(bits 3-5) per gate.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from quant_gru.kernels.derived import CalibrationCache, DerivedCache
from quant_gru.kernels.triton.weight_points import kept_value
from quant_gru.quantize.device_copies import device_copy
from quant_gru.quantize.params import DirectionQuant
from quant_gru.quantize.program import ACTIVATION_OPERATORS, ActivationFormat, DirectionProgram
from quant_gru.quantize.scales import dequantize, per_row

# Per operator, four float32 values: the scale, the thresholds of its clamp mask
# (point_thresholds) and one unused; Q_* say where each operator's start.
POINTS = tuple(name for name in ACTIVATION_OPERATORS if name != "input.x")


def _point(name: str) -> tl.constexpr:
    return tl.constexpr(4 * POINTS.index(name))


Q_H = _point("output.h")
Q_RH = _point("matmul.Rh")
Q_RB = _point("op.Rh_add_br")
Q_R_PRE = _point("gate.r_pre")
Q_Z_PRE = _point("gate.z_pre")
Q_R = _point("gate.r_out")
Q_Z = _point("gate.z_out")
Q_RRH = _point("op.rRh")
Q_G_PRE = _point("gate.g_pre")
Q_G = _point("gate.g_out")
Q_OLD = _point("op.old_contrib")
Q_NEW = _point("op.new_contrib")
Q_WX = _point("matmul.Wx")
# Then per channel (3H each): matmul.Rh's σ, weight.br's value.
Q_CHANNELS = tl.constexpr(4 * len(POINTS))
COEFFICIENTS = 5  # P, Ez, Eg, Er, En: blocks of H a (step, row) of the save
SAVE_BLOCKS = tl.constexpr(COEFFICIENTS)  # the same, for the kernels

# The model's type, for rounding each float operation's result as the PyTorch path does.
ROUND_FLOAT32, ROUND_BFLOAT16, ROUND_FLOAT16 = 0, 1, 2
_ROUNDING = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def rounding(dtype: torch.dtype) -> int:
    """The kernel's ROUND for a model of ``dtype`` (float32, bfloat16 or float16)."""
    if dtype not in _ROUNDING:
        raise ValueError(
            f"QAT on the Triton kernels takes float32, bfloat16 or float16, got {dtype}"
        )
    return _ROUNDING[dtype]


def qat_constants(
    program: DirectionProgram, quant: DirectionQuant, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """What the kernel reads at Q_*, float32: every point's scale and mask thresholds, then
    matmul.Rh's term scale per channel (the state's times R's row's, times 2^(e_a + e_c)),
    made once per calibration; and weight.br's dequantized values (3H,) in ``dtype``, the
    kernel's own pointer (no copy after a weight update: those kept with the codes)."""
    rows = 3 * program.hidden_size

    def calibrated() -> Tensor:
        head = _point_constants(tuple(program.formats[name] for name in POINTS), device)
        shifts = sum(program.terms["matmul.Rh"][0].operand_shifts)
        scale = float(program.formats["output.h"].scale) * 2.0**shifts
        sigma = _row_scales(quant, "weight.R", rows, device) * scale
        return torch.cat([head, sigma]).float()

    static = _CALIBRATED.get(program.terms, device, calibrated, "recurrent")
    return static, _bias_values(program.bias_r, quant, "weight.br", dtype, device)


# The parts of the constants that depend on a calibration alone, by the programs' terms.
_CALIBRATED: CalibrationCache[Tensor] = CalibrationCache()


# Cached: the programs are remade at every weight update, their points' formats only at a
# calibration, and a copy from the host to the device waits for the device's queue.
@functools.lru_cache(maxsize=64)
def _point_constants(formats: tuple[ActivationFormat, ...], device: torch.device) -> Tensor:
    """Each point's scale, mask thresholds and an unused zero, float64 on ``device``."""
    values: list[float] = []
    for fmt in formats:
        values += [float(fmt.scale), *point_thresholds(fmt), 0.0]
    return torch.tensor(values, dtype=torch.float64, device=device)


def _row_scales(quant: DirectionQuant, name: str, rows: int, device: torch.device) -> Tensor:
    """A weight point's scale per row, float64 on ``device`` (no read back from it)."""
    return per_row(device_copy(quant[name].scale, device, torch.float64), rows)


def _values(
    codes: Tensor, quant: DirectionQuant, name: str, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """A weight point's dequantized codes in ``dtype`` on ``device`` (those kept with the
    codes where they were made on the kernel)."""
    kept = kept_value(codes, dtype)
    if kept is not None and kept.device == device:
        return kept
    scales = _row_scales(quant, name, codes.shape[0], device)
    return dequantize(codes.to(device), scales, 0).to(dtype)


def projection_mask_values(
    program: DirectionProgram, quant: DirectionQuant, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """What the projection kernel computes QAT's matmul.Wx masks from: matmul.Wx's float value
    per unit of the exact product of the input's and W's codes (s_x times W's row scale;
    (3H,) float32, once per calibration), and weight.bw's dequantized values (3H,) in
    ``dtype``."""
    rows = 3 * program.hidden_size

    def calibrated() -> Tensor:
        x_scale = float(program.formats["input.x"].scale)
        return (_row_scales(quant, "weight.W", rows, device) * x_scale).float()

    sigma = _CALIBRATED.get(program.terms, device, calibrated, "projection")
    return sigma, _bias_values(program.bias_w, quant, "weight.bw", dtype, device)


def _bias_values(
    codes: Tensor, quant: DirectionQuant, name: str, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """A bias's dequantized codes (3H,) in ``dtype``, contiguous (the kernels read them): those
    kept with the codes where they were made on the kernel; once per codes tensor and type."""

    def make() -> Tensor:
        values = _values(codes, quant, name, dtype, device)
        return values if values.is_contiguous() else values.contiguous()

    return _BIASES.get(codes, device, make, dtype)


_BIASES: DerivedCache[Tensor] = DerivedCache()


@functools.lru_cache(maxsize=1024)
def point_thresholds(fmt: ActivationFormat) -> tuple[float, float]:
    """(low, high), float32 values: a float32 value v rounds inside the point's range,
    qmin <= floor(v / s + 1/2) + zp <= qmax, exactly when low <= v < high (v >= (qmin - zp -
    1/2) s and v < (qmax - zp + 1/2) s, each bound moved up to the next float32)."""
    scale = Fraction(float(fmt.scale))
    low = (Fraction(2 * (fmt.qmin - fmt.zero_point) - 1, 2)) * scale
    high = (Fraction(2 * (fmt.qmax - fmt.zero_point) + 1, 2)) * scale
    return _float32_at_or_above(low), _float32_at_or_above(high)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _float32_at_or_above(value: Fraction) -> float:
    """The least float32 value >= ``value`` (infinity above the largest)."""
    if value > _FLOAT32_MAX:
        return math.inf
    if value < -_FLOAT32_MAX:
        return -_FLOAT32_MAX
    candidate = np.float32(float(value))  # within an ulp or two of value
    while Fraction(float(candidate)) < value:
        candidate = np.nextafter(candidate, np.float32(math.inf))
    while True:
        below = np.nextafter(candidate, np.float32(-math.inf))
        if Fraction(float(below)) < value:
            return float(candidate)
        candidate = below


@triton.jit
def _rounded(v, ROUND: tl.constexpr):
    """float32 ``v`` rounded to the model's type (to nearest even) and back."""
    if ROUND == 1:
        bits = v.to(tl.uint32, bitcast=True)
        bits += ((bits >> 16) & 1) + 0x7FFF
        v = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    elif ROUND == 2:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def _value(code, qat, POINT: tl.constexpr, ROUND: tl.constexpr):
    """The dequantized value of zero-corrected codes, s (q - zp), in the model's type: in
    float32, one rounding of the exact product as quantize.scales.dequantize's float64 one
    then the type's conversion (codes below 2^24 in magnitude; wider ones round first)."""
    return _rounded(code.to(tl.float32) * tl.load(qat + POINT), ROUND)


@triton.jit
def _inside(value, qat, POINT: tl.constexpr):
    """Whether ``value`` rounds inside the point's range (point_thresholds): the
    straight-through mask of quantized_forward._straight_through."""
    return (value >= tl.load(qat + POINT + 1)) & (value < tl.load(qat + POINT + 2))


@triton.jit
def _qat_channels(qat, qat_bias, units, unit_ok, hidden, SAVE):
    """This program's per-channel QAT constants, (1, BH) float32 rows: matmul.Rh's σ per gate
    (after Q_CHANNELS of ``qat``), then weight.br's values per gate (``qat_bias``, the model's
    type); none without SAVE. (Unannotated, as gru_forward's _resident_tiles: mypy has no
    type for Triton's tuples; SAVE stays the caller's constexpr.)"""
    channels = ()
    for gate in tl.static_range(3 if SAVE else 0):
        place = qat + Q_CHANNELS + gate * hidden
        row = tl.load(place + units, mask=unit_ok, other=0.0)
        channels = channels + (row[None, :],)  # noqa: RUF005 (Triton's tuples take `+` only)
    for gate in tl.static_range(3 if SAVE else 0):
        place = qat_bias + gate * hidden
        row = tl.load(place + units, mask=unit_ok, other=0.0).to(tl.float32)
        channels = channels + (row[None, :],)  # noqa: RUF005
    return channels


@triton.jit
def _save_place(
    SAVE: tl.constexpr, save_ptr, mask_ptr, t, batch, rows, units, hidden, own, qat, channels
):  # fmt: skip
    """The ``save`` argument of integer_kernel._gru_step for step ``t`` (None without
    SAVE)."""
    if SAVE:
        place = (save_ptr, mask_ptr, t, batch, rows, units, hidden, own, qat, channels)
    else:
        place = None
    return place


@triton.jit
def _recurrent_masks(v, channels, rh, qat, ROUND: tl.constexpr):
    """Per gate: matmul.Rh's mask from its exact integer sums ``v`` (its float value σ v) and
    op.Rh_add_br's from matmul.Rh's codes ``rh`` and the bias; as bits 3-5 and 0-2."""
    bits = tl.zeros(v[0].shape, dtype=tl.int32)
    for gate in tl.static_range(3):
        product = _rounded(v[gate].to(tl.float32) * channels[gate], ROUND)
        bits |= _inside(product, qat, Q_RH).to(tl.int32) << (3 + gate)
        biased = _value(rh[gate], qat, Q_RH, ROUND) + channels[3 + gate]
        bits |= _inside(_rounded(biased, ROUND), qat, Q_RB).to(tl.int32) << gate
    return bits


@triton.jit
def _save_rows(save_ptr, mask_ptr, t, batch, rows, units, hidden):
    """Step ``t``'s rows of this program's block: in the coefficients (T, B, 5H) and in the
    mask bytes (T, B, H). Made again by each part of the save: addresses made once and held
    through the step took registers (sm_90a, 64 x 32 tiles on 8 warps: 0.50 KB spilled a
    thread against 0.48)."""
    save_row = save_ptr + (t * batch + rows[:, None]) * (SAVE_BLOCKS * hidden) + units[None, :]
    mask_row = mask_ptr + (t * batch + rows[:, None]) * hidden + units[None, :]
    return save_row, mask_row


# What the kernels store for QAT, in three parts that integer_kernel._gru_step calls as soon as
# the step has the codes each reads, so that those codes need not stay in registers until the
# step's end (compiled for sm_90a at 64 x 32 tiles on 8 warps, storing everything at the end
# spilled 0.93 KB a thread, in parts 0.48 KB; 16 x 16 tiles on 4 warps 0.14 KB and none).
# ``save``: (save_ptr, mask_ptr, t, batch, rows, units, hidden, own, qat constants pointer,
# _qat_channels' rows).


@triton.jit
def _save_recurrent(save, sums, kernel_channels, rh, ROUND: tl.constexpr):
    """The mask byte: matmul.Rh's masks from the recurrent sums (before the digit offset's
    correction, which ``kernel_channels``, integer_kernel's _channel_constants, hold) and
    op.Rh_add_br's from matmul.Rh's codes ``rh``, per gate."""
    save_ptr, mask_ptr, t, batch, rows, units, hidden, own, qat, channels = save
    _, mask_row = _save_rows(save_ptr, mask_ptr, t, batch, rows, units, hidden)
    v = (sums[0] + kernel_channels[6], sums[1] + kernel_channels[7], sums[2] + kernel_channels[8])
    bits = _recurrent_masks(v, channels, rh, qat, ROUND)
    tl.store(mask_row, bits.to(tl.int8), mask=own)


@triton.jit
def _save_gates(save, wx_r, wx_z, rb_r, rb_z, rb_n, r_pre, z_pre, r, z, rrh, ROUND: tl.constexpr):
    """Er and En from the gates r and z and op.rRh's codes; returns what the state's part
    reads of z: its value and the derivative of z^ with its masks (m_zpre m_zout σ'(z^))."""
    save_ptr, mask_ptr, t, batch, rows, units, hidden, own, qat, _ = save
    save_row, _ = _save_rows(save_ptr, mask_ptr, t, batch, rows, units, hidden)
    rb_n_value = _value(rb_n, qat, Q_RB, ROUND)
    r_in = _value(wx_r, qat, Q_WX, ROUND) + _value(rb_r, qat, Q_RB, ROUND)
    z_in = _value(wx_z, qat, Q_WX, ROUND) + _value(rb_z, qat, Q_RB, ROUND)
    r_sigmoid = _rounded(tl.sigmoid(_value(r_pre, qat, Q_R_PRE, ROUND)), ROUND)
    z_sigmoid = _rounded(tl.sigmoid(_value(z_pre, qat, Q_Z_PRE, ROUND)), ROUND)
    r_value = _value(r, qat, Q_R, ROUND)
    rrh_product = _rounded(r_value * rb_n_value, ROUND)
    keep_rrh = _inside(rrh_product, qat, Q_RRH)
    keep_r = _inside(_rounded(r_in, ROUND), qat, Q_R_PRE) & _inside(r_sigmoid, qat, Q_R)
    keep_z = _inside(_rounded(z_in, ROUND), qat, Q_Z_PRE) & _inside(z_sigmoid, qat, Q_Z)
    e_r = tl.where(keep_r & keep_rrh, rb_n_value * (r_sigmoid * (1.0 - r_sigmoid)), 0.0)
    e_n = tl.where(keep_rrh, r_value, 0.0)
    tl.store(save_row + 3 * hidden, e_r, mask=own)
    tl.store(save_row + 4 * hidden, e_n, mask=own)
    z_slope = tl.where(keep_z, z_sigmoid * (1.0 - z_sigmoid), 0.0)
    return _value(z, qat, Q_Z, ROUND), z_slope


@triton.jit
def _save_state(
    save, wx_n, rrh, g_pre, g, old, new, h, z_value, z_slope, ROUND: tl.constexpr
):  # fmt: skip
    """P, Ez and Eg from the candidate, the state before the step (``h``) and the new state's
    parts, with z's value and slope from _save_gates."""
    save_ptr, mask_ptr, t, batch, rows, units, hidden, own, qat, _ = save
    save_row, _ = _save_rows(save_ptr, mask_ptr, t, batch, rows, units, hidden)
    g_in = _value(wx_n, qat, Q_WX, ROUND) + _value(rrh, qat, Q_RRH, ROUND)
    g_tanh = _rounded(2.0 * tl.sigmoid(2.0 * _value(g_pre, qat, Q_G_PRE, ROUND)) - 1.0, ROUND)
    g_value = _value(g, qat, Q_G, ROUND)
    h_value = _value(h, qat, Q_H, ROUND)
    old_product = _rounded(z_value * h_value, ROUND)
    new_product = _rounded(_rounded(1.0 - z_value, ROUND) * g_value, ROUND)
    h_sum = _value(old, qat, Q_OLD, ROUND) + _value(new, qat, Q_NEW, ROUND)
    keep_h = _inside(_rounded(h_sum, ROUND), qat, Q_H)
    keep_old = keep_h & _inside(old_product, qat, Q_OLD)
    keep_new = keep_h & _inside(new_product, qat, Q_NEW)
    keep_g = _inside(_rounded(g_in, ROUND), qat, Q_G_PRE) & _inside(g_tanh, qat, Q_G)
    p = tl.where(keep_old, z_value, 0.0)
    carried = tl.where(keep_old, h_value, 0.0) - tl.where(keep_new, g_value, 0.0)
    e_g = tl.where(keep_g & keep_new, (1.0 - z_value) * (1.0 - g_tanh * g_tanh), 0.0)
    tl.store(save_row, p, mask=own)
    tl.store(save_row + hidden, z_slope * carried, mask=own)
    tl.store(save_row + 2 * hidden, e_g, mask=own)
