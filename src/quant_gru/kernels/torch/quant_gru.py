"""The integer GRU of reference/README.md in plain PyTorch: the CPU and GPU fallback.

Every value is an exact integer held in int64 on the device of the inputs. The input projection
(``matmul.Wx``) and the parts of the gate pre-activations that depend on it run for all steps in
one go; each step then does one recurrent product and a few dozen element-wise operations over
the batch and the channels. Activations are carried zero-corrected (``q̂ = q - zp``, §1) between
operators, so §5 reads ``q̂ = clamp(Σ t, qmin - zp, qmax - zp)``.

Products of matrices go through ``exact_int_matmul``: float64 matrix products whose every partial
sum is an integer below 2^53 (so exact), splitting operands into limbs when §4's bound is wider.
CUDA has no int64 matmul, and the CPU runs the same code so that both give the same codes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
import torch
from torch import Tensor

from quant_gru.kernels.derived import CalibrationCache
from quant_gru.quantize.program import ACTIVATION_OPERATORS, ActivationFormat, DirectionProgram
from quant_gru.quantize.requant import TERM_LIMIT, Term, ceil_log2
from quant_gru.quantize.tables import Table

__all__ = [
    "TRACED_OPERATORS",
    "TermChannels",
    "apply_term",
    "exact_int_matmul",
    "prepared_codes",
    "quantized_gru",
    "rounding_right_shift",
    "saturating_left_shift",
    "table_lookup",
    "term_channels",
]

FLOAT64_EXACT_BITS = 52  # float64 sums of integers of magnitude <= 2^52 are exact
_LONGEST_SHIFT = 62  # shift amounts beyond this are handled explicitly (§3)
_LUT_ENTRIES = 1 << 18  # tables spanning at most this many codes are expanded into a lookup table

TRACED_OPERATORS = ACTIVATION_OPERATORS

Traces = list[dict[str, Tensor]]
_Constant = int | Tensor  # one value for every channel, or one per channel (last dimension)


# --- §3 ------------------------------------------------------------------------------------------


def rounding_right_shift(v: Tensor, n: int | Tensor) -> Tensor:
    """rshr(v, n) of §3 on int64: floor((v + 2^(n-1)) / 2^n), ties towards +inf; v for n = 0,
    0 for n >= 63 (|v| < 2^62). ``n`` >= 0: an int or an int64 tensor broadcast against v."""
    if isinstance(n, int):
        if n < 0:
            raise ValueError(f"rshr needs a shift of at least 0, got {n}")
        if n == 0:
            return v
        if n > _LONGEST_SHIFT:
            return torch.zeros_like(v)
        return (v + (1 << (n - 1))) >> n
    n = n.to(device=v.device, dtype=torch.int64)
    shift = n.clamp(0, _LONGEST_SHIFT)
    half = torch.where(shift > 0, torch.ones_like(shift) << (shift - 1).clamp(min=0), 0)
    shifted = (v + half) >> shift
    return torch.where(n > _LONGEST_SHIFT, 0, shifted)


def saturating_left_shift(v: Tensor, s: int | Tensor) -> Tensor:
    """clamp(v * 2^s, -2^60, 2^60) for s >= 0 (§4, n <= 0), without overflowing int64."""
    if isinstance(s, int):
        if s < 0:
            raise ValueError(f"a left shift needs s >= 0, got {s}")
        limit = (TERM_LIMIT >> min(s, 61)) + 1
        scaled = v.clamp(-limit, limit) * (1 << min(s, _LONGEST_SHIFT))
        return scaled.clamp(-TERM_LIMIT, TERM_LIMIT)
    shift = s.to(device=v.device, dtype=torch.int64).clamp(0, _LONGEST_SHIFT)
    bound = (TERM_LIMIT >> shift.clamp(max=61)) + 1
    scaled = torch.minimum(torch.maximum(v, -bound), bound) * (torch.ones_like(shift) << shift)
    return scaled.clamp(-TERM_LIMIT, TERM_LIMIT)


# --- §4 ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scaler:
    """A term's §4 constants on the device, reduced to the operations that can change the result.

    The term is ``t = rshr(v' * mult, right)``, clamped to +-2^60 when ``saturate`` says that can
    change anything. ``mult`` folds in the sign of a negated term when p = 0, the factor 2^s of
    a left shift (n = -s) and, so that every channel shares one shift, a factor 2^(right - n)
    (exact: rshr(v * 2^d, n + d) = rshr(v, n)); channels with n >= 63 get m = 0. Where a left
    shift could overflow int64 (``limit`` set), v' * m is clamped to +-limit before the
    multiplication by ``left`` = 2^s instead. ``half`` (2^(right-1), a device tensor) is added
    in the same kernel as the product.
    """

    pre_shift: _Constant
    negate_first: bool
    mult: _Constant
    limit: _Constant | None
    left: _Constant
    half: Tensor
    right: _Constant
    saturate: bool

    @property
    def fusable(self) -> bool:
        """Whether a product term can be formed in one kernel with its multiply and rounding."""
        return (
            _is(self.pre_shift, 0)
            and not self.negate_first
            and self.limit is None
            and isinstance(self.mult, int)
            and not _is(self.right, 0)
        )

    def __call__(self, v: Tensor) -> Tensor:
        """The term of v; the result may be v itself or a new tensor, never v modified."""
        if self.negate_first:
            v = -v
        if not _is(self.pre_shift, 0):
            v = rounding_right_shift(v, self.pre_shift)
        if self.limit is not None:
            v = _clamp_(v * self.mult, _neg(self.limit), self.limit).mul_(self.left)
            v.add_(self.half).bitwise_right_shift_(self.right)
        elif not _is(self.right, 0):
            if isinstance(self.mult, int):
                v = torch.add(self.half, v, alpha=self.mult)
            else:
                v = torch.addcmul(self.half, v, self.mult)
            v.bitwise_right_shift_(self.right)
        elif not _is(self.mult, 1):
            v = v * self.mult
        elif self.saturate:
            v = v.clone()
        if self.saturate:
            v.clamp_(-TERM_LIMIT, TERM_LIMIT)
        return v

    def product(self, a: Tensor, c: Tensor, shifts: tuple[int, int]) -> Tensor:
        """The term of the product a * c, with §4's operand pre-shifts `shifts`; a new tensor."""
        if shifts != (0, 0) or not self.fusable:
            return self(_product(a, c, shifts))
        assert isinstance(self.mult, int)
        v = torch.addcmul(self.half, a, c, value=self.mult)
        v.bitwise_right_shift_(self.right)
        if self.saturate:
            v.clamp_(-TERM_LIMIT, TERM_LIMIT)
        return v


def _is(value: _Constant, number: int) -> bool:
    return isinstance(value, int) and value == number


def _neg(value: _Constant) -> _Constant:
    return -value


def _clamp(v: Tensor, lo: _Constant, hi: _Constant) -> Tensor:
    if isinstance(lo, int) and isinstance(hi, int):
        return v.clamp(lo, hi)
    return torch.clamp(v, min=_tensor(lo, v), max=_tensor(hi, v))


def _clamp_(v: Tensor, lo: _Constant, hi: _Constant) -> Tensor:
    """In-place _clamp, for tensors nothing else refers to."""
    if isinstance(lo, int) and isinstance(hi, int):
        return v.clamp_(lo, hi)
    return v.clamp_(min=_tensor(lo, v), max=_tensor(hi, v))


def _tensor(value: _Constant, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value
    return torch.tensor(value, dtype=torch.int64, device=like.device)


def _collapse(values: np.ndarray, device: torch.device) -> _Constant:
    """One int when every channel agrees (cheaper to apply), else an int64 tensor (C,)."""
    if values.size and (values == values[0]).all():
        return int(values[0])
    return _on_device(values, device)


def _bounds(lo: np.ndarray, hi: np.ndarray, device: torch.device) -> tuple[_Constant, _Constant]:
    """Per-channel clamp bounds: both ints, or both tensors."""
    low, high = _collapse(lo, device), _collapse(hi, device)
    if isinstance(low, int) and isinstance(high, int):
        return low, high
    return _on_device(lo, device), _on_device(hi, device)


def _on_device(values: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)).to(device)


_POWERS_OF_TWO = np.array([1 << k for k in range(_LONGEST_SHIFT + 1)], dtype=np.int64)


def _ceil_log2(values: np.ndarray) -> np.ndarray:
    """ceil(log2 |x|) per element (0 for 0 and 1), exactly."""
    return np.searchsorted(_POWERS_OF_TWO, values, side="left").astype(np.int64)


def _scaler(
    parts: Sequence[tuple[Term, int]],
    value_bits: int | None,
    single: bool,
    device: torch.device,
    negate: bool = False,
) -> _Scaler:
    """Prepare terms laid side by side along the channels (`parts`: term and channel count).

    value_bits: B with |v| <= 2^B for the term integer v (before the pre-shift p), or None
    when only §4's guarantee |v' * m| < 2^62 is known. single: the term is its operator's only
    one, so the final clamp of §5 subsumes the clamp to +-2^60.
    """
    columns: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for term, width in parts:
        m = term.m.cpu().numpy().astype(np.int64)
        n = term.n.cpu().numpy().astype(np.int64)
        if m.size == 1:
            m, n = np.repeat(m, width), np.repeat(n, width)
        if m.size != width:
            raise ValueError(f"a term with {m.size} channels cannot serve {width} channels")
        columns.append((m, n, np.full(width, term.pre_shift, dtype=np.int64)))
    m, n, p = (np.concatenate([column[i] for column in columns]) for i in range(3))
    negate_first = negate and bool(p.any())  # rshr(-v, p) != -rshr(v, p) in general
    if negate and not negate_first:
        m = -m
    if value_bits is None:
        bits = np.full(m.shape, _LONGEST_SHIFT, dtype=np.int64)  # §4: |v' * m| < 2^62
    else:
        bits = np.maximum(value_bits - p, 0) + _ceil_log2(np.abs(m))
    beyond = n > _LONGEST_SHIFT  # rshr by 63 or more gives 0: so does m = 0
    m, bits, n = np.where(beyond, 0, m), np.where(beyond, 0, bits), np.minimum(n, _LONGEST_SHIFT)
    saturates = np.where(n >= 1, bits - n >= 60, bits - n > 60)
    saturate = bool(saturates.any()) and not single
    right = max(int(n.max()) if n.size else 0, 0)
    if (bits + right - n <= _LONGEST_SHIFT).all():  # one shift shared by every channel
        return _Scaler(
            pre_shift=_collapse(p, device),
            negate_first=negate_first,
            mult=_collapse(m * np.left_shift(1, right - n), device),
            limit=None,
            left=1,
            half=torch.tensor((1 << (right - 1)) if right else 0, device=device),
            right=right,
            saturate=saturate,
        )
    wide = bool((bits - n > _LONGEST_SHIFT).any())
    lefts = np.left_shift(1, np.clip(-n, 0, _LONGEST_SHIFT))
    limits = np.where(
        n <= 0, np.right_shift(TERM_LIMIT, np.clip(-n, 0, 61)) + 1, 1 << _LONGEST_SHIFT
    )
    rights = np.maximum(n, 0)
    halves = np.where(rights > 0, np.left_shift(1, np.maximum(rights - 1, 0)), 0)
    return _Scaler(
        pre_shift=_collapse(p, device),
        negate_first=negate_first,
        mult=_collapse(m if wide else m * lefts, device),
        limit=_collapse(limits, device) if wide else None,
        left=_collapse(lefts, device),
        half=_on_device(halves, device),
        right=_collapse(rights, device),
        saturate=saturate,
    )


def apply_term(v: Tensor, term: Term, negate: bool = False) -> Tensor:
    """The term t of §4 for term integers v (..., C) (C = the term's channels, or any when the
    term has one): pre-shift p, multiply by m, rshr by n or saturated left shift, clamp to
    +-2^60. ``negate``: the term of -v (§5). Operand shifts are the caller's."""
    return _term_scaler(term, v.shape[-1] if v.dim() else 1, v.device, negate)(v)


def _term_scaler(term: Term, width: int, device: torch.device, negate: bool = False) -> _Scaler:
    """apply_term's scaler of ``term`` over ``width`` channels, made once per calibration."""

    def make() -> _Scaler:
        return _scaler([(term, width)], None, False, device, negate)

    return _APPLIED.get(term, device, make, (width, negate))


# apply_term's scalers by term: the kernels apply the bias terms whenever the weights change
# (every QAT step), while the terms live as long as a calibration; making a scaler copies its
# constants to the device, which waits for the device's queue.
_APPLIED: CalibrationCache[_Scaler] = CalibrationCache(size=256)


@dataclass(frozen=True)
class TermChannels:
    """A term that is a plain rounding shift of a product per channel: t = (h + v * m) >> n,
    clamped to +-2^60 where ``saturate``; ``channels`` (3, C) int64 holds m, h and n."""

    channels: Tensor
    saturate: bool


def term_channels(term: Term, width: int, device: torch.device) -> TermChannels | None:
    """apply_term's term over ``width`` channels as TermChannels, for a kernel to form in one
    pass; None when the term takes more (a pre-shift, a negation first, a left shift that
    could overflow). Made once per term, device and width."""

    def make() -> TermChannels | None:
        scaler = _term_scaler(term, width, device)
        if not _is(scaler.pre_shift, 0) or scaler.negate_first or scaler.limit is not None:
            return None
        parts = [
            torch.as_tensor(value, dtype=torch.int64, device=device).expand(width)
            for value in (scaler.mult, scaler.half, scaler.right)
        ]
        return TermChannels(torch.stack(parts).contiguous(), scaler.saturate)

    return _CHANNELS.get(term, device, make, width)


_CHANNELS: CalibrationCache[TermChannels | None] = CalibrationCache(size=256)


def _product(a: Tensor, c: Tensor, shifts: tuple[int, int]) -> Tensor:
    """The integer a * c of a product term, with §4's operand pre-shifts."""
    return rounding_right_shift(a, shifts[0]) * rounding_right_shift(c, shifts[1])


# --- exact integer matrix products (§4 bounds) -------------------------------------------------


@dataclass(frozen=True)
class _LimbPlan:
    """Operands split into limbs of the given widths so each limb product sum is below 2^52."""

    a_limbs: int
    a_width: int
    b_limbs: int
    b_width: int


def _limb_plan(a_bits: int, b_bits: int, depth_bits: int) -> _LimbPlan:
    if a_bits + b_bits + depth_bits <= FLOAT64_EXACT_BITS:
        return _LimbPlan(1, a_bits, 1, b_bits)
    budget = FLOAT64_EXACT_BITS - depth_bits
    if budget < 2:
        raise ValueError(f"a dot product of 2^{depth_bits} terms is too long to split into limbs")
    best: _LimbPlan | None = None
    for a_width in range(1, budget):
        b_width = budget - a_width
        plan = _LimbPlan(
            max(1, -(-a_bits // a_width)), a_width, max(1, -(-b_bits // b_width)), b_width
        )
        if best is None or plan.a_limbs * plan.b_limbs < best.a_limbs * best.b_limbs:
            best = plan
    assert best is not None
    return best


def _split(x: Tensor, limbs: int, width: int) -> list[Tensor]:
    """x = Σ_i limb_i 2^(i*width): low limbs in [0, 2^width), the top one signed."""
    parts = []
    mask = (1 << width) - 1
    for _ in range(limbs - 1):
        parts.append(x & mask)
        x = x >> width
    parts.append(x)
    return parts


class _ExactMatmul:
    """a @ b for int64 a (..., K) and a fixed int64 b (K, N), exactly, in float64 products.

    Limb products are summed per weight 2^shift in int64 and combined from the highest shift
    down (Horner), so no intermediate exceeds |result| + 2^56: exact for results below 2^62.
    """

    def __init__(self, b: Tensor, a_bits: int, b_bits: int) -> None:
        depth, self.columns = b.shape
        self.bound_bits = a_bits + b_bits + ceil_log2(depth)
        self.plan = _limb_plan(a_bits, b_bits, ceil_log2(depth))
        parts = _split(b, self.plan.b_limbs, self.plan.b_width)
        self.b = torch.cat([part.double() for part in parts], dim=1)
        groups: dict[int, list[tuple[int, int]]] = {}
        for i in range(self.plan.a_limbs):
            for j in range(self.plan.b_limbs):
                shift = i * self.plan.a_width + j * self.plan.b_width
                groups.setdefault(shift, []).append((i, j))
        self.groups = sorted(groups.items(), reverse=True)

    def __call__(self, a: Tensor) -> Tensor:
        lead = a.shape[:-1]
        rows = a.reshape(-1, a.shape[-1])
        if self.plan.a_limbs == 1:
            stacked = rows.double()
        else:
            parts = _split(rows, self.plan.a_limbs, self.plan.a_width)
            stacked = torch.cat([part.double() for part in parts], dim=0)
        products = (stacked @ self.b).to(torch.int64)
        if len(self.groups) == 1:
            return products.view(*lead, self.columns)
        products = products.view(self.plan.a_limbs, rows.shape[0], self.plan.b_limbs, -1)
        total: Tensor | None = None
        previous = 0
        for shift, pairs in self.groups:
            group = products[pairs[0][0], :, pairs[0][1]]
            for i, j in pairs[1:]:
                group = group + products[i, :, j]
            total = group if total is None else total * (1 << (previous - shift)) + group
            previous = shift
        assert total is not None
        if previous:
            total = total * (1 << previous)
        return total.view(*lead, self.columns)


def exact_int_matmul(
    a: Tensor, b: Tensor, bound_bits: int, operand_bits: tuple[int, int] | None = None
) -> Tensor:
    """a (..., K) @ b (K, N) for int64 operands, exactly, on any device.

    bound_bits: §4's static bound alpha(a) + alpha(b) + ceil(log2 K), at most 62. Up to 52 bits
    one float64 product is exact; wider, the operands are split into limbs whose products are.
    operand_bits: (alpha(a), alpha(b)) with |a| <= 2^alpha(a), |b| <= 2^alpha(b) when known
    (fewer limbs); otherwise each is taken as bound_bits - ceil(log2 K).
    """
    if bound_bits > _LONGEST_SHIFT:
        raise ValueError(
            f"an exact int64 matmul needs a bound of at most 62 bits, got {bound_bits}"
        )
    depth_bits = ceil_log2(b.shape[0])
    if bound_bits <= FLOAT64_EXACT_BITS:
        a_bits, b_bits = 0, bound_bits - depth_bits  # one float64 product
    elif operand_bits is not None:
        a_bits, b_bits = operand_bits
    else:
        a_bits = b_bits = max(bound_bits - depth_bits, 0)
    return _ExactMatmul(b, a_bits, b_bits)(a)


# --- §6 ------------------------------------------------------------------------------------------


def table_lookup(table: Table, q: Tensor) -> Tensor:
    """Evaluate a §6 table on int64 codes q (any shape): saturated ends, linear interpolation
    with rshr between the knots."""
    y = table.y.to(q.device)
    padded = torch.cat([y, y[-1:]])  # so the last knot interpolates with itself
    k = table.k
    d = (q - table.c_lo).clamp(0, (y.numel() - 1) << k)
    j = d >> k
    r = d - (j << k)
    low = padded[j]
    return low + rounding_right_shift((padded[j + 1] - low) * r, k)


class _Activation:
    """Tables of §6 side by side along the channels.

    When every input code range is small, the tables are expanded once into one lookup table
    of every input code (``lut``); a channel's index is its zero-corrected input plus
    ``index_shift``, and one gather per step gives zero-corrected outputs. Otherwise
    `table_lookup` evaluates them on zero-corrected inputs (``index_shift`` = 0).
    """

    def __init__(
        self,
        parts: Sequence[tuple[Table, ActivationFormat, ActivationFormat, int]],
        device: torch.device,
    ) -> None:
        self.parts = [(Table(t.c_lo, t.k, t.y.to(device)), i, o, w) for t, i, o, w in parts]
        sizes = [source.qmax - source.qmin + 1 for _, source, _, _ in parts]
        self.lut: Tensor | None = None
        self.index_shift: _Constant = 0
        if sum(sizes) > _LUT_ENTRIES:
            return
        luts, shifts = [], []
        offset = 0
        for (table, source, target, width), size in zip(self.parts, sizes, strict=True):
            codes = torch.arange(source.qmin, source.qmax + 1, device=device)
            luts.append(table_lookup(table, codes) - target.zero_point)
            shifts.append(np.full(width, source.zero_point - source.qmin + offset, dtype=np.int64))
            offset += size
        self.lut = torch.cat(luts)
        self.index_shift = _collapse(np.concatenate(shifts), device)

    def __call__(self, index: Tensor) -> Tensor:
        if self.lut is not None:
            return torch.take(self.lut, index)
        outputs, start = [], 0
        for table, source, target, width in self.parts:
            codes = index[..., start : start + width] + source.zero_point
            outputs.append(table_lookup(table, codes) - target.zero_point)
            start += width
        return torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]


# --- §7 and §8 -----------------------------------------------------------------------------------


def _bits(fmt: ActivationFormat) -> int:
    """alpha = b of §1, from the code range."""
    return (fmt.qmax - fmt.qmin).bit_length()


def _range(fmt: ActivationFormat) -> tuple[int, int]:
    """The clamp bounds of §5 on zero-corrected codes."""
    return fmt.qmin - fmt.zero_point, fmt.qmax - fmt.zero_point


def _magnitude_bits(codes: Tensor) -> int:
    """A bound B with |codes| <= 2^B (one host read, once per call)."""
    return int(codes.abs().max().item()).bit_length() if codes.numel() else 0


def _product_bits(bits: dict[str, int], a: str, c: str, term: Term) -> int:
    """alpha of a product term's integer after the operand pre-shifts (§4)."""
    e_a, e_c = term.operand_shifts
    return max(bits[a] - e_a, 0) + max(bits[c] - e_c, 0)


def _gate_bounds(
    formats: Sequence[tuple[ActivationFormat, int]], shift: _Constant, device: torch.device
) -> tuple[_Constant, _Constant]:
    """§5 clamp bounds of pre-activations laid side by side, moved by the activation's
    index shift (so the clamped sum is the table index)."""
    lo = np.concatenate([np.full(w, f.qmin - f.zero_point, dtype=np.int64) for f, w in formats])
    hi = np.concatenate([np.full(w, f.qmax - f.zero_point, dtype=np.int64) for f, w in formats])
    moved = shift.cpu().numpy() if isinstance(shift, Tensor) else shift
    return _bounds(lo + moved, hi + moved, device)


class _Direction:
    """One (layer, direction) program with its constants on the device, ready to run (§7)."""

    def __init__(
        self, program: DirectionProgram, device: torch.device, below: Sequence[ActivationFormat]
    ) -> None:
        fmt = program.formats
        terms = program.terms
        bits = {name: _bits(f) for name, f in fmt.items()}
        hidden = self.hidden = program.hidden_size

        # Layer boundary (§8): one term per direction of the layer below.
        if below and len(terms["input.x"]) != len(below):
            raise ValueError(
                f"input.x has {len(terms['input.x'])} terms, the layer below "
                f"{len(below)} directions"
            )
        self.input_terms = [
            _scaler([(term, 1)], _bits(f), True, device)
            for term, f in zip(terms["input.x"], below, strict=False)
        ]
        self.x_range = _range(fmt["input.x"])

        # matmul.Wx: dot product (operand shifts on W here, on x per call) and bias.
        dot, bias = terms["matmul.Wx"]
        self.x_shift = dot.operand_shifts[1]
        weight = rounding_right_shift(program.weight_W, dot.operand_shifts[0])
        x_bits = max(bits["input.x"] - self.x_shift, 0)
        self.wx_matmul = _ExactMatmul(weight.to(device).t(), x_bits, _magnitude_bits(weight))
        self.wx_dot = _scaler([(dot, 3 * hidden)], self.wx_matmul.bound_bits, False, device)
        self.wx_bias = _scaler([(bias, 3 * hidden)], None, False, device)(program.bias_w.to(device))
        self.wx_range = _range(fmt["matmul.Wx"])

        # matmul.Rh: recurrent dot product, one term.
        (dot,) = terms["matmul.Rh"]
        self.h_shift = dot.operand_shifts[1]
        weight = rounding_right_shift(program.weight_R, dot.operand_shifts[0])
        h_bits = max(bits["output.h"] - self.h_shift, 0)
        self.rh_matmul = _ExactMatmul(weight.to(device).t(), h_bits, _magnitude_bits(weight))
        self.rh_dot = _scaler([(dot, 3 * hidden)], self.rh_matmul.bound_bits, True, device)
        self.rh_range = _range(fmt["matmul.Rh"])

        # op.Rh_add_br
        rh_term, bias = terms["op.Rh_add_br"]
        self.rb_rh = _scaler([(rh_term, 3 * hidden)], bits["matmul.Rh"], False, device)
        self.rb_bias = _scaler([(bias, 3 * hidden)], None, False, device)(program.bias_r.to(device))
        self.rb_range = _range(fmt["op.Rh_add_br"])

        # gate.r_pre and gate.z_pre side by side (2H channels), clamped straight into the index
        # of their sigmoid tables.
        r_wx, r_rb = terms["gate.r_pre"]
        z_wx, z_rb = terms["gate.z_pre"]
        self.rz_wx = _scaler([(r_wx, hidden), (z_wx, hidden)], bits["matmul.Wx"], False, device)
        self.rz_rb = _scaler([(r_rb, hidden), (z_rb, hidden)], bits["op.Rh_add_br"], False, device)
        self.rz_act = _Activation(
            [
                (program.tables["gate.r_out"], fmt["gate.r_pre"], fmt["gate.r_out"], hidden),
                (program.tables["gate.z_out"], fmt["gate.z_pre"], fmt["gate.z_out"], hidden),
            ],
            device,
        )
        self.rz_bounds = _gate_bounds(
            [(fmt["gate.r_pre"], hidden), (fmt["gate.z_pre"], hidden)],
            self.rz_act.index_shift,
            device,
        )

        # op.rRh = r * Rb_n
        (term,) = terms["op.rRh"]
        self.rrh_shifts = term.operand_shifts
        self.rrh = _scaler(
            [(term, hidden)], _product_bits(bits, "gate.r_out", "op.Rh_add_br", term), True, device
        )
        self.rrh_range = _range(fmt["op.rRh"])

        # gate.g_pre, clamped into the index of its tanh table
        g_wx, g_rrh = terms["gate.g_pre"]
        self.g_wx = _scaler([(g_wx, hidden)], bits["matmul.Wx"], False, device)
        self.g_rrh = _scaler([(g_rrh, hidden)], bits["op.rRh"], False, device)
        self.g_act = _Activation(
            [(program.tables["gate.g_out"], fmt["gate.g_pre"], fmt["gate.g_out"], hidden)],
            device,
        )
        self.g_bounds = _gate_bounds([(fmt["gate.g_pre"], hidden)], self.g_act.index_shift, device)

        # op.old_contrib = z * h
        (term,) = terms["op.old_contrib"]
        self.old_shifts = term.operand_shifts
        self.old = _scaler(
            [(term, hidden)], _product_bits(bits, "gate.z_out", "output.h", term), True, device
        )
        self.old_range = _range(fmt["op.old_contrib"])

        # op.new_contrib = g - z * g
        g_term, zg_term = terms["op.new_contrib"]
        self.new_g = _scaler([(g_term, hidden)], bits["gate.g_out"], False, device)
        self.zg_shifts = zg_term.operand_shifts
        zg_bits = _product_bits(bits, "gate.z_out", "gate.g_out", zg_term)
        self.new_zg = _scaler([(zg_term, hidden)], zg_bits, False, device, negate=True)
        self.new_range = _range(fmt["op.new_contrib"])

        # output.h = old + new
        old_term, new_term = terms["output.h"]
        self.h_old = _scaler([(old_term, hidden)], bits["op.old_contrib"], False, device)
        self.h_new = _scaler([(new_term, hidden)], bits["op.new_contrib"], False, device)
        self.h_range = _range(fmt["output.h"])

    def layer_input(self, below: Sequence[Tensor]) -> Tensor:
        """Zero-corrected input.x codes from the zero-corrected outputs of the layer below (§8)."""
        blocks = [
            _clamp(scale(out), *self.x_range)
            for scale, out in zip(self.input_terms, below, strict=True)
        ]
        return torch.cat(blocks, dim=-1)

    def run(
        self, x: Tensor, h: Tensor, active: Tensor | None, reverse: bool, trace: bool
    ) -> tuple[Tensor, Tensor, dict[str, Tensor] | None]:
        """One direction over the zero-corrected inputs x (T, B, I) from h (B, H) (§7, §8).

        Returns zero-corrected outputs (T, B, H) (0 at padded steps), the final state and, with
        `trace`, zero-corrected values of every operator (not yet masked at padded steps).
        """
        steps, hidden = x.shape[0], self.hidden
        operand = rounding_right_shift(x, self.x_shift)
        wx = _clamp_(self.wx_dot(self.wx_matmul(operand)) + self.wx_bias, *self.wx_range)
        # The terms of gate.{r,z,g}_pre that come from matmul.Wx, for every step at once,
        # moved by the table index shift.
        rz_from_wx = self.rz_wx(wx[..., : 2 * hidden]) + self.rz_act.index_shift
        g_from_wx = self.g_wx(wx[..., 2 * hidden :]) + self.g_act.index_shift
        outputs: list[Tensor] = [h] * steps
        names = ["matmul.Rh", "op.Rh_add_br", "rz", "rz_out", "op.rRh", "g", "gate.g_out"]
        names += ["op.old_contrib", "op.new_contrib"]
        records: dict[str, list[Tensor]] = {name: [h] * steps for name in names}
        for t in range(steps - 1, -1, -1) if reverse else range(steps):
            rh = self.rh_matmul(rounding_right_shift(h, self.h_shift))
            rh = _clamp_(self.rh_dot(rh), *self.rh_range)
            rb = _clamp_(self.rb_rh(rh) + self.rb_bias, *self.rb_range)
            rz_index = _clamp_(rz_from_wx[t] + self.rz_rb(rb[:, : 2 * hidden]), *self.rz_bounds)
            rz = self.rz_act(rz_index)
            r, z = rz[:, :hidden], rz[:, hidden:]
            rrh = _clamp_(
                self.rrh.product(r, rb[:, 2 * hidden :], self.rrh_shifts), *self.rrh_range
            )
            g_index = _clamp_(g_from_wx[t] + self.g_rrh(rrh), *self.g_bounds)
            g = self.g_act(g_index)
            old = _clamp_(self.old.product(z, h, self.old_shifts), *self.old_range)
            new = self.new_g(g) + self.new_zg.product(z, g, self.zg_shifts)
            new = _clamp_(new, *self.new_range)
            h_next = _clamp_(self.h_old(old) + self.h_new(new), *self.h_range)
            outputs[t] = h_next
            h = h_next if active is None else torch.where(active[t], h_next, h)
            if trace:
                values = (rh, rb, rz_index, rz, rrh, g_index, g, old, new)
                for name, value in zip(names, values, strict=True):
                    records[name][t] = value
        out = torch.stack(outputs) if steps else x.new_zeros(0, x.shape[1], hidden)
        if active is not None:
            out = torch.where(active, out, 0)
        if not trace:
            return out, h, None
        widths = {"matmul.Rh": 3, "op.Rh_add_br": 3, "rz": 2, "rz_out": 2}
        stacked = {
            name: torch.stack(values)
            if steps
            else x.new_zeros(0, x.shape[1], widths.get(name, 1) * hidden)
            for name, values in records.items()
        }
        r_pre, z_pre = (stacked.pop("rz") - self.rz_act.index_shift).split(hidden, dim=-1)
        r_out, z_out = stacked.pop("rz_out").split(hidden, dim=-1)
        g_pre = stacked.pop("g") - self.g_act.index_shift
        traced = {"input.x": x, "matmul.Wx": wx, "gate.r_pre": r_pre, "gate.z_pre": z_pre}
        traced.update({"gate.r_out": r_out, "gate.z_out": z_out, "gate.g_pre": g_pre})
        traced.update(stacked)
        traced["output.h"] = out
        return out, h, traced


def _codes(values: Tensor, fmt: ActivationFormat, active: Tensor | None) -> Tensor:
    """Zero-corrected values back to codes; padded steps hold the zero point (§8)."""
    codes = values + fmt.zero_point
    if active is None:
        return codes
    return torch.where(active, codes, fmt.zero_point)


@overload
def prepared_codes(
    programs: Sequence[DirectionProgram],
    x_codes: Tensor,
    h0_codes: Tensor,
    lengths: Tensor | None,
    num_layers: int,
    num_dirs: int,
    steps_mask: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]: ...


@overload
def prepared_codes(
    programs: Sequence[DirectionProgram],
    x_codes: Tensor,
    h0_codes: Tensor | None,
    lengths: Tensor | None,
    num_layers: int,
    num_dirs: int,
    steps_mask: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None]: ...


def prepared_codes(
    programs: Sequence[DirectionProgram],
    x_codes: Tensor,
    h0_codes: Tensor | None,
    lengths: Tensor | None,
    num_layers: int,
    num_dirs: int,
    steps_mask: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The arguments of a realization of the integer GRU checked (ValueError where they
    disagree) and made ready: x_codes and h0_codes as int64 on x_codes' device (None, a zero
    state, where a realization takes it so), and where ``lengths`` are given and
    ``steps_mask`` asks for it the (T, B, 1) mask of the steps inside each sequence."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    if len(programs) != num_layers * num_dirs:
        raise ValueError(
            f"expected {num_layers * num_dirs} programs for {num_layers} layers and "
            f"{num_dirs} directions, got {len(programs)}"
        )
    if x_codes.dim() != 3 or (h0_codes is not None and h0_codes.dim() != 3):
        raise ValueError("x_codes must be (T, B, I) and h0_codes (L*D, B, H)")
    device = x_codes.device
    active = None
    if lengths is not None and steps_mask:
        time = torch.arange(x_codes.shape[0], device=device).unsqueeze(1)
        active = (time < lengths.to(device).view(1, -1)).unsqueeze(-1)
    if h0_codes is not None:
        h0_codes = h0_codes.to(device=device, dtype=torch.int64)
    return x_codes.to(torch.int64), h0_codes, active


def quantized_gru(
    programs: Sequence[DirectionProgram],
    x_codes: Tensor,
    h0_codes: Tensor,
    lengths: Tensor | None,
    num_layers: int,
    bidirectional: bool,
    trace: bool = False,
) -> tuple[Tensor, Tensor, Traces | None]:
    """The integer GRU (§7, §8) on codes, on the device of `x_codes`.

    programs: one per (layer, direction), index layer * D + direction. x_codes: int64 (T, B, I)
    codes of layer 0's input.x, whose parameters both directions share and read from the first
    direction's program (§8). h0_codes: int64 (L*D, B, H) codes of output.h. lengths: int64
    (B,) or None.

    Returns the last layer's output.h codes (T, B, D*H) (zp(output.h) at padded steps), the final
    codes h_n (L*D, B, H), and with `trace` one dict per program of every operator's codes
    (T, B, C) (each operator's zero point at padded steps), else None.
    """
    num_dirs = 2 if bidirectional else 1
    x_codes, h0_codes, active = prepared_codes(
        programs, x_codes, h0_codes, lengths, num_layers, num_dirs
    )
    device = x_codes.device
    outputs_of = [
        [p.formats["output.h"] for p in programs[i : i + num_dirs]]
        for i in range(0, len(programs), num_dirs)
    ]
    # Every constant is prepared (and moved to the device) before the first step is queued.
    runs = [
        _Direction(program, device, outputs_of[index // num_dirs - 1] if index >= num_dirs else [])
        for index, program in enumerate(programs)
    ]

    finals: list[Tensor] = []
    traces: Traces = []
    below: list[Tensor] = []
    for layer in range(num_layers):
        outputs: list[Tensor] = []
        for direction in range(num_dirs):
            index = layer * num_dirs + direction
            program, run = programs[index], runs[index]
            formats = dict(program.formats)
            if layer == 0:
                formats["input.x"] = programs[0].formats["input.x"]
                x = x_codes - formats["input.x"].zero_point
            else:
                x = run.layer_input(below)
            h0 = h0_codes[index] - formats["output.h"].zero_point
            out, h_n, traced = run.run(x, h0, active, direction == 1, trace)
            outputs.append(out)
            finals.append(h_n + formats["output.h"].zero_point)
            if traced is not None:
                traces.append(
                    {name: _codes(traced[name], formats[name], active) for name in TRACED_OPERATORS}
                )
        below = outputs
    out_codes = torch.cat(
        [_codes(out, fmt, active) for out, fmt in zip(below, outputs_of[-1], strict=True)], dim=-1
    )
    return out_codes, torch.stack(finals), traces if trace else None
