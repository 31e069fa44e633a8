"""Where the integer kernel finds its scalar constants: indices into one tuple of integers,
the kernel's compile-time specialization (every shift, multiplier and bound an immediate).

The kernel (integer_kernel.py) and the host that fills the tuple (integer_constants.py) both
read these names, so the layout has one definition. Per-channel constants (the recurrent
product's multipliers and shifts, the recurrent bias term, the digit offset's correction) are
tensors of their own.

``NARROW`` kernels (every value of one step within 32 bits, every term a plain rounding right
shift: KernelConstants.narrow) read the same layout.
"""

from __future__ import annotations

import triton.language as tl

_size = 0


def _field(width: int) -> tl.constexpr:
    """The next ``width`` entries of the vector."""
    global _size
    start, _size = _size, _size + width
    return tl.constexpr(start)


# Terms of one channel each (§4): m at +0, n at +1, the pre-shift p at +2.
TERM_RB_FROM_RH = _field(3)  # op.Rh_add_br <- matmul.Rh
TERM_R_FROM_WX = _field(3)  # gate.r_pre <- matmul.Wx (gate r's rows)
TERM_R_FROM_RB = _field(3)  # gate.r_pre <- op.Rh_add_br (gate r's rows)
TERM_Z_FROM_WX = _field(3)  # gate.z_pre <- matmul.Wx (gate z's rows)
TERM_Z_FROM_RB = _field(3)  # gate.z_pre <- op.Rh_add_br (gate z's rows)
TERM_RRH = _field(3)  # op.rRh <- r * Rb_n
TERM_G_FROM_WX = _field(3)  # gate.g_pre <- matmul.Wx (gate n's rows)
TERM_G_FROM_RRH = _field(3)  # gate.g_pre <- op.rRh
TERM_OLD = _field(3)  # op.old_contrib <- z * h
TERM_NEW_FROM_G = _field(3)  # op.new_contrib <- g
TERM_NEW_FROM_ZG = _field(3)  # op.new_contrib <- -(z * g)
TERM_H_FROM_OLD = _field(3)  # output.h <- op.old_contrib
TERM_H_FROM_NEW = _field(3)  # output.h <- op.new_contrib
# Clamp bounds of §5 on zero-corrected values: low at +0, high at +1.
RANGE_RH = _field(2)
RANGE_RB = _field(2)
RANGE_R_PRE = _field(2)
RANGE_Z_PRE = _field(2)
RANGE_RRH = _field(2)
RANGE_G_PRE = _field(2)
RANGE_OLD = _field(2)
RANGE_NEW = _field(2)
RANGE_H = _field(2)
# Tables of §6: c_lo at +0, k at +1, the input's zero point at +2, the output's at +3.
TABLE_R = _field(4)
TABLE_Z = _field(4)
TABLE_G = _field(4)
# matmul.Rh: the term's pre-shift p, the state's operand shift e_c, and the digit offset.
RH_PRE_SHIFT = _field(1)
H_OPERAND_SHIFT = _field(1)
H_DIGIT_OFFSET = _field(1)
WX_ZERO_POINT = _field(1)  # matmul.Wx's (the kernel reads its codes)
# matmul.Rh's shift shared by every channel (their multipliers scaled to it), or -1: each its own.
RH_SHIFT = _field(1)
# Operand shifts (e_a, e_c) of the three product terms.
SHIFTS_RRH = _field(2)
SHIFTS_OLD = _field(2)
SHIFTS_ZG = _field(2)
SCALARS = _size

# Each operator's single-channel terms, in §7's order.
TERMS = {
    "op.Rh_add_br": (TERM_RB_FROM_RH, None),  # the bias term is per channel
    "gate.r_pre": (TERM_R_FROM_WX, TERM_R_FROM_RB),
    "gate.z_pre": (TERM_Z_FROM_WX, TERM_Z_FROM_RB),
    "op.rRh": (TERM_RRH,),
    "gate.g_pre": (TERM_G_FROM_WX, TERM_G_FROM_RRH),
    "op.old_contrib": (TERM_OLD,),
    "op.new_contrib": (TERM_NEW_FROM_G, TERM_NEW_FROM_ZG),
    "output.h": (TERM_H_FROM_OLD, TERM_H_FROM_NEW),
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
