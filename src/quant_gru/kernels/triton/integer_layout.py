"""Where the integer kernel finds its scalar constants: indices into one int64 vector.

The kernel (integer_kernel.py) and the host that fills the vector (integer_gru.py) both read
these names, so the layout has one definition. Per-channel constants (the recurrent product's
multipliers and shifts, the recurrent bias term, the digit offset's correction) are tensors of
their own.
"""

from __future__ import annotations

import triton.language as tl

# Terms of one channel each (§4): m at +0, n at +1, the pre-shift p at +2.
TERM_RB_FROM_RH = tl.constexpr(0)  # op.Rh_add_br <- matmul.Rh
TERM_R_FROM_RB = tl.constexpr(3)  # gate.r_pre <- op.Rh_add_br (gate r's rows)
TERM_Z_FROM_RB = tl.constexpr(6)  # gate.z_pre <- op.Rh_add_br (gate z's rows)
TERM_RRH = tl.constexpr(9)  # op.rRh <- r * Rb_n
TERM_G_FROM_RRH = tl.constexpr(12)  # gate.g_pre <- op.rRh
TERM_OLD = tl.constexpr(15)  # op.old_contrib <- z * h
TERM_NEW_FROM_G = tl.constexpr(18)  # op.new_contrib <- g
TERM_NEW_FROM_ZG = tl.constexpr(21)  # op.new_contrib <- -(z * g)
TERM_H_FROM_OLD = tl.constexpr(24)  # output.h <- op.old_contrib
TERM_H_FROM_NEW = tl.constexpr(27)  # output.h <- op.new_contrib
# Clamp bounds of §5 on zero-corrected values: low at +0, high at +1.
RANGE_RH = tl.constexpr(30)
RANGE_RB = tl.constexpr(32)
RANGE_R_PRE = tl.constexpr(34)
RANGE_Z_PRE = tl.constexpr(36)
RANGE_RRH = tl.constexpr(38)
RANGE_G_PRE = tl.constexpr(40)
RANGE_OLD = tl.constexpr(42)
RANGE_NEW = tl.constexpr(44)
RANGE_H = tl.constexpr(46)
# Tables of §6: c_lo at +0, k at +1, the input's zero point at +2, the output's at +3.
TABLE_R = tl.constexpr(48)
TABLE_Z = tl.constexpr(52)
TABLE_G = tl.constexpr(56)
# matmul.Rh: the term's pre-shift p, the state's operand shift e_c, and the digit offset.
RH_PRE_SHIFT = tl.constexpr(60)
H_OPERAND_SHIFT = tl.constexpr(61)
H_DIGIT_OFFSET = tl.constexpr(62)
# Operand shifts (e_a, e_c) of the three product terms.
SHIFTS_RRH = tl.constexpr(63)
SHIFTS_OLD = tl.constexpr(65)
SHIFTS_ZG = tl.constexpr(67)
SCALARS = 69

TERMS = {
    "op.Rh_add_br": TERM_RB_FROM_RH,
    "gate.r_pre": TERM_R_FROM_RB,
    "gate.z_pre": TERM_Z_FROM_RB,
    "op.rRh": TERM_RRH,
    "gate.g_pre": TERM_G_FROM_RRH,
    "op.old_contrib": TERM_OLD,
    "op.new_contrib.g": TERM_NEW_FROM_G,
    "op.new_contrib.zg": TERM_NEW_FROM_ZG,
    "output.h.old": TERM_H_FROM_OLD,
    "output.h.new": TERM_H_FROM_NEW,
}
RANGES = {
    "matmul.Rh": RANGE_RH,
    "op.Rh_add_br": RANGE_RB,
    "gate.r_pre": RANGE_R_PRE,
    "gate.z_pre": RANGE_Z_PRE,
    "op.rRh": RANGE_RRH,
    "gate.g_pre": RANGE_G_PRE,
    "op.old_contrib": RANGE_OLD,
    "op.new_contrib": RANGE_NEW,
    "output.h": RANGE_H,
}
TABLES = {"gate.r_out": TABLE_R, "gate.z_out": TABLE_Z, "gate.g_out": TABLE_G}
PRODUCT_SHIFTS = {"op.rRh": SHIFTS_RRH, "op.old_contrib": SHIFTS_OLD, "op.new_contrib": SHIFTS_ZG}
# The kernel's trace (T, B, 15H): each operator's zero-corrected values of every step, in
# blocks of H channels (3H for the two that cover all gates), in this order.
TRACE_BLOCKS = (
    ("matmul.Rh", 3),
    ("op.Rh_add_br", 3),
    ("gate.r_pre", 1),
    ("gate.z_pre", 1),
    ("gate.r_out", 1),
    ("gate.z_out", 1),
    ("op.rRh", 1),
    ("gate.g_pre", 1),
    ("gate.g_out", 1),
    ("op.old_contrib", 1),
    ("op.new_contrib", 1),
)
TRACE_WIDTH = sum(width for _, width in TRACE_BLOCKS)
