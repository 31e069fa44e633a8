"""The integer kernel's constants for one (layer, direction), derived from its DirectionProgram:
the scalar vector of integer_layout.py, matmul.Rh's per-channel constants, R in the digits of
integer_digits.py, the activation tables' knots; and how narrow the kernel may run.

``KernelConstants.narrow``, the kernel's NARROW:
- 1: every value the kernel carries and every term integer stays below 2^31 in magnitude, and
  every term is a plain rounding right shift of v * m (no pre-shift, no operand shift,
  1 <= n <= 62, no saturation at 2^60); the kernel carries values in int32 and forms terms in
  int64.
- 2 (SHORT): besides, every value and every term stays below 2^29 (SHORT_LIMIT), so a sum of
  two terms and a bias fits int32, and the activation tables' interpolation does too: the
  kernel keeps everything but the products v * m in int32 (half the registers, and 32-bit
  compares and additions instead of pairs of them).
- 0: the general int64 kernel.
The bounds come from the operators' code ranges (|v| <= 2^B of §4, made exact), so the narrow
kernels compute the very integers of §4. An 8-bit configuration with float scales is SHORT;
wide widths and power-of-two scales whose ratios are left shifts are not narrow.

The constants of the quantization parameters are made once per calibration (``_STATIC``);
those of the weights (R's digits, its row sums, the recurrent bias term) once per program,
which quantized_forward.ProgramCache keeps while the weights are unchanged.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor

from quant_gru.kernels.derived import CalibrationCache, DerivedCache
from quant_gru.kernels.torch.quant_gru import rounding_right_shift
from quant_gru.kernels.triton import integer_layout as layout
from quant_gru.kernels.triton.integer_digits import (
    MAX_PRODUCT_TERMS,
    digit_offset,
    digits_for_span,
    digits_for_values,
    split_digits,
)
from quant_gru.kernels.triton.weight_operands import bias_term, one_digit_operands
from quant_gru.quantize.program import ActivationFormat, DirectionProgram
from quant_gru.quantize.requant import Term

_NARROW_LIMIT = 2**31  # int32 magnitudes
SHORT_LIMIT = 2**29  # NARROW 2: values and terms below this (two terms and a bias fit int32)
_SHORT_BIAS = 2**30  # NARROW 2: op.Rh_add_br's bias term saturated here (see _make_constants)
_TERM_LIMIT_BITS = 60  # §4's saturation bound
_LONGEST_SHIFT = 62  # §3: rshr by more gives 0


@dataclass(frozen=True)
class KernelConstants:
    """What the kernel reads besides the step inputs, for one (layer, direction)."""

    digits: Tensor  # (r_digits, 3H, H) int8: R, operand-shifted, in digits
    words: Tensor | None  # (3H, H/4) int32: one-digit R, four digits of K a word (dp4a)
    rh: Tensor  # (3, 3H) int64: matmul.Rh's m, n, and o * rowsum(R) modulo 2^64
    rb_bias: Tensor  # (3H,) int64: op.Rh_add_br's term of weight.br
    specialization: tuple[int, ...]  # integer_layout's constants: the kernel's C
    tables: Tensor  # (3, 513) int64
    output_scale: Tensor  # (1,) float64: output.h's scale (the kernel's float outputs)
    h_digits: int
    r_digits: int
    narrow: int  # the kernel's NARROW: 0, 1 or 2 (the module's docstring)


def zero_corrected_range(fmt: ActivationFormat) -> tuple[int, int]:
    """§5's clamp bounds on zero-corrected values."""
    return fmt.qmin - fmt.zero_point, fmt.qmax - fmt.zero_point


def shifted(value: int, shift: int) -> int:
    """rshr of §3 on one integer (monotone: bounds shift to bounds)."""
    return value if shift == 0 else (value + (1 << (shift - 1))) >> shift


def shifted_range(program: DirectionProgram, point: str, shift: int) -> tuple[int, int]:
    """The (low, high) bounds of a weight point's codes after §4's operand shift by ``shift``
    (rshr is monotone: bounds shift to bounds)."""
    low, high = program.weight_ranges[point]
    return shifted(low, shift), shifted(high, shift)


def magnitude(fmt: ActivationFormat) -> int:
    """The largest |q - zp| of the operator's codes."""
    return max(abs(v) for v in zero_corrected_range(fmt))


@dataclass(frozen=True)
class _Static:
    """The part of the constants that depends on the quantization parameters alone (the
    weights' codes enter only through their formats' ranges: no read back from the device,
    which would wait for its queue at every weight update)."""

    specialization: tuple[int, ...]
    tables: Tensor
    output_scale: Tensor
    rh_multipliers: Tensor  # (2, 3H): m and n of matmul.Rh (m scaled to a shared shift)
    h_digits: int
    h_offset: int
    r_digits: int
    narrow: int  # KernelConstants.narrow


# Static parts by the program's terms. A DirectionProgram shares its terms with the
# DirectionConstants it was made from, which live as long as a calibration, so every forward
# between two calibrations finds them here.
_STATIC: CalibrationCache[_Static] = CalibrationCache()


def _static(program: DirectionProgram, device: torch.device) -> _Static:
    return _STATIC.get(program.terms, device, lambda: _make_static(program, device))


def _make_static(program: DirectionProgram, device: torch.device) -> _Static:
    fmt, terms, rows = program.formats, program.terms, 3 * program.hidden_size
    scalars = [0] * layout.SCALARS

    def put(where: object, *values: int) -> None:
        start = int(where.value)  # type: ignore[attr-defined]  # a tl.constexpr
        scalars[start : start + len(values)] = values

    for name, places in layout.TERMS.items():
        for where, term in zip(places, terms[name], strict=True):
            if where is not None:
                _check_single_channel(name, term)
                put(where, int(term.m.item()), int(term.n.item()), term.pre_shift)
    for name, where in layout.RANGES.items():
        put(where, *zero_corrected_range(fmt[name]))
    for name, where in layout.PRODUCT_SHIFTS.items():
        put(where, *terms[name][-1].operand_shifts)  # op.new_contrib's product is its last
    sources = {"gate.r_out": "gate.r_pre", "gate.z_out": "gate.z_pre", "gate.g_out": "gate.g_pre"}
    for name, where in layout.TABLES.items():
        table = program.tables[name]
        put(where, table.c_lo, table.k, fmt[sources[name]].zero_point, fmt[name].zero_point)
    put(layout.WX_ZERO_POINT, fmt["matmul.Wx"].zero_point)

    (rh_dot,) = terms["matmul.Rh"]
    h_shift = rh_dot.operand_shifts[1]
    h_low, h_high = (shifted(v, h_shift) for v in zero_corrected_range(fmt["output.h"]))
    h_digits = digits_for_span(h_low, h_high)
    offset = digit_offset(h_low, h_digits)
    put(layout.RH_PRE_SHIFT, rh_dot.pre_shift)
    put(layout.H_OPERAND_SHIFT, h_shift)
    put(layout.H_DIGIT_OFFSET, offset)
    put(layout.RH_SHIFT, -1)

    hidden = program.hidden_size
    weight_low, weight_high = shifted_range(program, "weight.R", rh_dot.operand_shifts[0])
    r_digits = digits_for_values(weight_low, weight_high)
    if hidden * min(h_digits, r_digits) > MAX_PRODUCT_TERMS:
        raise ValueError(
            f"hidden_size {hidden} is too large for exact int32 sums of "
            f"{min(h_digits, r_digits)}-digit products (at most {MAX_PRODUCT_TERMS})"
        )
    h_magnitude = max(abs(h_low), abs(h_high))  # the largest |rshr(q - zp, e_c)| of the state
    recurrent_bound = max(abs(weight_low), abs(weight_high)) * h_magnitude * hidden
    narrow = _narrow_terms(program) and plain_term(rh_dot, recurrent_bound)
    short = narrow and _short_terms(program) and term_bound(rh_dot, recurrent_bound) < SHORT_LIMIT
    multipliers = torch.stack([_channels(rh_dot.m, rows), _channels(rh_dot.n, rows)])
    shared = _shared_shift(rh_dot, rows)
    # One shift for every channel where that is exact for every term integer, or for the
    # NARROW kernel's (below 2^31).
    if shared is not None and (narrow or shared[2]):
        multipliers = torch.stack([shared[1], multipliers[1]])
        put(layout.RH_SHIFT, shared[0])
    return _Static(
        specialization=tuple(scalars),
        tables=torch.stack([program.tables[name].y for name in layout.TABLES]).to(device),
        output_scale=torch.tensor([fmt["output.h"].scale], dtype=torch.float64, device=device),
        rh_multipliers=multipliers.to(device),
        h_digits=h_digits,
        h_offset=offset,
        r_digits=r_digits,
        narrow=2 if short else int(narrow),
    )


_CONSTANTS: DerivedCache[KernelConstants] = DerivedCache()


def kernel_constants(program: DirectionProgram, device: torch.device) -> KernelConstants:
    """The kernel's constants for ``program``, on ``device``, made once per program (those of
    its quantization parameters once per calibration)."""
    return _CONSTANTS.get(program, device, lambda: _make_constants(program, device))


def _make_constants(program: DirectionProgram, device: torch.device) -> KernelConstants:
    static = _static(program, device)
    terms, hidden = program.terms, program.hidden_size
    rows = 3 * hidden
    (rh_dot,) = terms["matmul.Rh"]
    codes = program.weight_R.to(device, torch.int64)
    r_digits = static.r_digits
    # clamp(t + b, lo, hi) with |t|, |lo|, |hi| < 2^29 is the same for b and for b saturated
    # at +-2^30 (both sums lie past the range, on b's side), which the SHORT kernel reads in
    # int32.
    short = (-_SHORT_BIAS, _SHORT_BIAS) if static.narrow == 2 else ()
    bias = bias_term(program.bias_r.to(device, torch.int64), terms["op.Rh_add_br"][1], 0, *short)
    if r_digits == 1:  # one launch for R's digits, rh with o * rowsum(R), and the bias term
        operands = one_digit_operands(
            codes, rh_dot.operand_shifts[0], static.h_offset, static.rh_multipliers, bias=bias
        )
        digits, rh, rb_bias = operands.digits.view(1, rows, hidden), operands.rows, operands.bias
        assert rb_bias is not None
    else:
        weight = rounding_right_shift(codes, rh_dot.operand_shifts[0])
        # o * rowsum(R) wraps modulo 2^64 like the kernel's sums (integer_digits).
        correction = weight.sum(dim=1) * static.h_offset
        digits = split_digits(weight, r_digits).view(r_digits, rows, hidden)
        rh = torch.cat([static.rh_multipliers, correction[None]]).contiguous()
        rb_bias = bias.value(rows)
    return KernelConstants(
        digits=digits,
        words=packed_words(digits[0]) if r_digits == 1 and hidden % 4 == 0 else None,
        rh=rh,
        rb_bias=rb_bias,
        specialization=static.specialization,
        tables=static.tables,
        output_scale=static.output_scale,
        h_digits=static.h_digits,
        r_digits=r_digits,
        narrow=static.narrow,
    )


def _shared_shift(term: Term, rows: int) -> tuple[int, Tensor, bool] | None:
    """One shift N for every channel of matmul.Rh's term, with multipliers m * 2^(N - n) that
    give the same rshr(v * m, n) (the numerator and 2^n both scaled by 2^(N - n)): when every
    n is the same (then for any term integer: True), or when every n lies in [1, 62] and the
    scaled multipliers stay below 2^31, so that NARROW term integers (below 2^31) keep the
    products below 2^62 (False). Channels with n > 62 give 0: multiplier 0. None otherwise."""
    m = _channels(term.m, rows).tolist()
    n = _channels(term.n, rows).tolist()
    if len(set(n)) == 1:
        return n[0], torch.tensor(m, dtype=torch.int64), True
    if min(n) < 1:
        return None
    shift = min(max(n), _LONGEST_SHIFT)
    scaled = [0 if ni > _LONGEST_SHIFT else mi << (shift - ni) for mi, ni in zip(m, n, strict=True)]
    if max(abs(v) for v in scaled) >= _NARROW_LIMIT:
        return None
    return shift, torch.tensor(scaled, dtype=torch.int64), False


def packed_words(digits: Tensor) -> Tensor:
    """int8 digits (..., K), K a multiple of 4, as int32 words of four consecutive digits,
    the first in the lowest byte: the operands of dp4a."""
    if digits.is_cuda or sys.byteorder == "little":  # the bytes as they lie are those words
        return digits.contiguous().view(torch.int32)
    parts = digits.to(torch.int64).reshape(*digits.shape[:-1], -1, 4) & 0xFF
    shifts = torch.arange(0, 32, 8, device=digits.device)  # made there: no copy from the host
    words = (parts << shifts).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def _check_single_channel(name: str, term: Term) -> None:
    if term.m.numel() != 1:
        raise ValueError(f"{name}: a single-channel term was expected, got {term.m.numel()}")


def _channels(values: Tensor, width: int) -> Tensor:
    """A term's per-channel constant (1 or ``width`` values) as ``width`` int64 values."""
    return values.to(torch.int64).expand(width)


def plain_term(term: Term, bound: int) -> bool:
    """Whether the term of integers |v| <= bound is rshr(v * m, n) with everything in range:
    no pre-shifts, 1 <= n <= 62, v within int32 and |t| <= 2^60."""
    n, m = term.n.to(torch.int64), term.m.to(torch.int64).abs()
    if term.pre_shift or any(term.operand_shifts) or bound >= _NARROW_LIMIT:
        return False
    if int(n.min()) < 1 or int(n.max()) > 62 or int(m.max()) >= _NARROW_LIMIT:
        return False
    # |rshr(v * m, n)| <= (bound * m + 2^(n-1)) / 2^n <= 2^60 where bound * m < 2^(60 + n - 1).
    return bound * int(m.max()) < 2 ** (_TERM_LIMIT_BITS + int(n.min()) - 1)


def term_bound(term: Term, bound: int) -> int:
    """The largest |rshr(v * m, n)| of a plain term (``plain_term``) over |v| <= bound, over
    all its channels."""
    n, m = int(term.n.min()), int(term.m.to(torch.int64).abs().max())
    return (bound * m + (1 << (n - 1))) >> n


def _term_checks(program: DirectionProgram) -> list[tuple[Term, int]]:
    """Every term but matmul.Rh's with the bound of its integer (products of two codes: the
    product's)."""
    terms, mag = program.terms, {name: magnitude(f) for name, f in program.formats.items()}
    return [
        (terms["op.Rh_add_br"][0], mag["matmul.Rh"]),
        (terms["gate.r_pre"][0], mag["matmul.Wx"]),
        (terms["gate.r_pre"][1], mag["op.Rh_add_br"]),
        (terms["gate.z_pre"][0], mag["matmul.Wx"]),
        (terms["gate.z_pre"][1], mag["op.Rh_add_br"]),
        (terms["op.rRh"][0], mag["gate.r_out"] * mag["op.Rh_add_br"]),
        (terms["gate.g_pre"][0], mag["matmul.Wx"]),
        (terms["gate.g_pre"][1], mag["op.rRh"]),
        (terms["op.old_contrib"][0], mag["gate.z_out"] * mag["output.h"]),
        (terms["op.new_contrib"][0], mag["gate.g_out"]),
        (terms["op.new_contrib"][1], mag["gate.z_out"] * mag["gate.g_out"]),
        (terms["output.h"][0], mag["op.old_contrib"]),
        (terms["output.h"][1], mag["op.new_contrib"]),
    ]


def _short_terms(program: DirectionProgram) -> bool:
    """Whether the SHORT kernel computes ``program``'s every value, every term but the
    recurrent product's, and the tables exactly in int32 (given ``_narrow_terms``): values and
    terms below SHORT_LIMIT; in a table, the offset pre-activation, the span of its segments
    and a segment's rise times its remainder below 2^31."""
    fmt = program.formats
    if any(magnitude(f) >= SHORT_LIMIT for f in fmt.values()):
        return False
    if any(term_bound(term, bound) >= SHORT_LIMIT for term, bound in _term_checks(program)):
        return False
    sources = {"gate.r_out": "gate.r_pre", "gate.z_out": "gate.z_pre", "gate.g_out": "gate.g_pre"}
    for name, source in sources.items():
        table, out = program.tables[name], fmt[name]
        offset = abs(fmt[source].zero_point - table.c_lo)
        rise = (out.qmax - out.qmin) << table.k
        if (
            magnitude(fmt[source]) + offset >= SHORT_LIMIT
            or max(rise, 512 << table.k) >= SHORT_LIMIT
        ):
            return False
    return True


def _narrow_terms(program: DirectionProgram) -> bool:
    """Whether the NARROW kernel computes ``program``'s every value and every term but the
    recurrent product's exactly (that one's bound depends on the weights)."""
    mag = {name: magnitude(f) for name, f in program.formats.items()}
    # Every operator's values are carried in int32 too (the gate pre-activations are no term's
    # integer: they index the tables).
    fits = all(bound < _NARROW_LIMIT for bound in mag.values())
    return fits and all(plain_term(term, bound) for term, bound in _term_checks(program))
