"""QAT's operands made on one kernel each against their plain-PyTorch makings, bit for bit,
in every float type, with values that saturate, NaN and infinities:

- the weights (kernels/triton/weight_points.py): the codes of every weight and bias
  (quantize.program.quantize_weight) and their points (quantized_forward.weight_point: the
  dequantized codes and clamp masks), for every granularity, widths up to 32 bits, float and
  power-of-two scales;
- the first layer's input (kernels/triton/qat_input.py): its codes less the zero point
  (input_codes'), operand
  digits (digit_input_projection's), dequantized values (quantize.scales.dequantize's in the
  model's type) and clamp masks (integer_qat's), for inputs of one digit and wider;
- W's and R's one-digit operands (kernels/triton/weight_operands.py): the shifted codes as
  digits, the head rows with o * rowsum, wrapping modulo 2^64, and the biases'
  terms against apply_term.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from quant_gru import QuantGRU
from quant_gru.config import OPERATORS, WEIGHT_OPERATORS

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel module is first imported
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

from quant_gru.kernels.torch.quant_gru import apply_term, rounding_right_shift  # noqa: E402
from quant_gru.kernels.torch.quantized_forward import (  # noqa: E402
    build_programs,
    input_codes,
    weight_point,
)
from quant_gru.kernels.triton.integer_projection import projection_operands  # noqa: E402
from quant_gru.kernels.triton.integer_qat import _dequantized, _mask  # noqa: E402
from quant_gru.kernels.triton.qat_input import qat_input  # noqa: E402
from quant_gru.kernels.triton.qat_save import point_thresholds  # noqa: E402
from quant_gru.kernels.triton.weight_operands import (  # noqa: E402
    bias_term,
    one_digit_operands,
    one_digit_operands_reference,
)
from quant_gru.kernels.triton.weight_points import (  # noqa: E402
    kernel_weight_point,
    kernel_weights_codes,
)
from quant_gru.quantize.program import quantize_weight  # noqa: E402
from quant_gru.quantize.requant import Term  # noqa: E402
from quant_gru.quantize.scales import dequantize  # noqa: E402

NAMES = ("weight.W", "weight.R", "weight.bw", "weight.br")


def _config(
    path: Path, width: int, granularity: str, scale_type: str, input_width: int = 8
) -> Path:
    operators: dict = {}
    for name in OPERATORS:
        entry: dict = {"bitwidth": input_width if name == "input.x" else 8}
        if name in WEIGHT_OPERATORS:
            entry.update(
                bitwidth=width, is_symmetric=True, is_unsigned=False, granularity=granularity
            )
        else:
            entry.update(is_symmetric=False, is_unsigned=False)
        operators[name] = entry
    config = {
        "GRU_config": {"default_config": {"scale_type": scale_type}, "operator_config": operators}
    }
    path.write_text(json.dumps(config))
    return path


def _calibrated(config: Path, dtype: torch.dtype) -> QuantGRU:
    torch.manual_seed(0)
    model = QuantGRU(6, 5)
    model.load_bitwidth_config(config)
    model.calibrating = True
    with torch.no_grad():
        model(torch.randn(4, 2, 6))
    model.calibrating = False
    model.finalize_calibration()
    return model.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("width", "granularity", "scale_type"),
    [
        (8, "per_tensor", "float"),
        (4, "per_gate", "pot"),
        (16, "per_channel", "float"),
        (32, "per_channel", "float"),
        (2, "per_gate", "float"),
    ],
)
def test_kernel_weight_points_equal_the_plain_points(
    tmp_path: Path, dtype: torch.dtype, width: int, granularity: str, scale_type: str
) -> None:
    model = _calibrated(_config(tmp_path / "config.json", width, granularity, scale_type), dtype)
    with torch.no_grad():  # past the calibrated ranges, and values that are not numbers
        for parameter in model.parameters():
            parameter.mul_(1.7)
        model.weight_hh_l0[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        model.bias_ih_l0[1] = float("nan")
    quantized = model._quantized_model()
    weights = model._direction_weights()[0]
    (program,) = build_programs(quantized, [weights])
    quant = quantized.quant[0]
    saturated = 0
    for name, value in zip(NAMES, weights, strict=True):
        expected_value, expected_mask = weight_point(program, quant, name, value)
        (codes,) = kernel_weights_codes([value], [quant[name]])
        assert torch.equal(codes, quantize_weight(value, quant[name])), name
        strided = torch.stack([value, value], dim=-1)[..., 0]  # the same values, not contiguous
        assert not strided.is_contiguous()
        assert torch.equal(kernel_weights_codes([strided], [quant[name]])[0], codes), name
        # Made afresh, and kept from the codes' making.
        for points in (
            kernel_weight_point(value, quant[name]),
            kernel_weight_point(value, quant[name], codes),
        ):
            value_on_kernel, mask_on_kernel = points
            assert value_on_kernel.dtype == mask_on_kernel.dtype == dtype
            assert torch.equal(value_on_kernel, expected_value), name
            assert torch.equal(mask_on_kernel, expected_mask), name
        saturated += int((expected_mask == 0).sum())
    assert saturated > 3  # the case exercises the masks, not only the NaN and infinities


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 0, 1), (1, 2, 3, 0, 1, 2), (2,)])
def test_weights_made_together_equal_each_made_alone(
    tmp_path: Path, order: tuple[int, ...]
) -> None:
    """kernel_weights_codes launches up to four weights at once (blocks split among them,
    places left over unused): the same codes and points as one at a time, in any order and
    count, with an empty weight among them."""
    model = _calibrated(_config(tmp_path / "config.json", 8, "per_channel", "float"), torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.7)
    quant = model._quantized_model().quant[0]
    weights = model._direction_weights()[0]
    chosen = [weights[i] for i in order] + [weights[0][:0]]  # and an empty one
    quants = [quant[NAMES[i]] for i in order] + [quant["weight.W"]]
    together = kernel_weights_codes(chosen, quants)
    assert len(together) == len(chosen)
    for codes, value, operator in zip(together, chosen, quants, strict=True):
        assert torch.equal(codes, quantize_weight(value, operator))
        alone = kernel_weight_point(value, operator)
        kept = kernel_weight_point(value, operator, codes)
        assert torch.equal(kept[0], alone[0]) and torch.equal(kept[1], alone[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("input_width", "scale_type"), [(8, "float"), (6, "pot"), (16, "float")])
def test_kernel_qat_input_equals_the_plain_operands(
    tmp_path: Path, dtype: torch.dtype, input_width: int, scale_type: str
) -> None:
    config = _config(tmp_path / "config.json", 8, "per_channel", scale_type, input_width)
    model = _calibrated(config, dtype)
    (program,) = build_programs(model._quantized_model(), model._direction_weights())
    x = (torch.randn(5, 3, 6, generator=torch.Generator().manual_seed(3)) * 2.5).to(DEVICE, dtype)
    x[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    fmt = program.formats["input.x"]
    x[1, 0, :2] = torch.tensor(point_thresholds(fmt))  # the mask's edges, in x's type

    made = qat_input(x, program)
    zero_corrected = input_codes(x, [program]) - fmt.zero_point
    assert torch.equal(made.levels, zero_corrected)
    expected_value = dequantize(zero_corrected, fmt.scale, 0).to(dtype)  # float64, rounded
    assert torch.equal(made.point.value, expected_value)
    assert torch.equal(_dequantized(zero_corrected, fmt, dtype), expected_value)
    assert made.point.value.dtype == made.point.mask.dtype == dtype
    assert torch.equal(made.point.mask, _mask(x, fmt))
    assert 0 < int(made.point.mask.sum()) < made.point.mask.numel()  # some inputs saturate
    operands = projection_operands(program, x.device)
    assert made.operand == (operands.x_shift, operands.x_offset)
    if input_width > 8:
        assert made.digits is None
        return
    assert made.digits is not None
    operand = rounding_right_shift(zero_corrected, operands.x_shift) - operands.x_offset
    assert torch.equal(made.digits, operand.to(torch.int8))


@pytest.mark.parametrize(
    ("rows", "columns", "shift", "offset"),
    [
        (1, 1, 0, 0),
        (5, 3, 1, -128),
        (37, 300, 3, 129),  # rows and columns past one block
        (48, 128, 0, 2**50),  # o * rowsum wraps modulo 2^64
        (17, 9, 62, -(2**40)),
        (4, 7, 63, 5),  # rshr by more than 62 gives 0
    ],
)
@pytest.mark.parametrize("head_rows", [0, 2])
def test_one_digit_operands_equal_the_plain_ones(
    rows: int, columns: int, shift: int, offset: int, head_rows: int
) -> None:
    generator = torch.Generator().manual_seed(rows * 1000 + columns + shift)
    span = min(2**shift, 2**40)  # codes whose rshr takes one digit
    codes = torch.randint(-128 * span, 127 * span + 1, (rows, columns), generator=generator)
    codes[0, 0] = -128 * span  # the digit range's ends
    codes[-1, -1] = 127 * span
    codes = codes.to(DEVICE)
    head = None
    if head_rows:
        head = torch.randint(-(2**62), 2**62, (head_rows, rows), generator=generator).to(DEVICE)
    made = one_digit_operands(codes, shift, offset, head)
    expected = one_digit_operands_reference(codes, shift, offset, head)
    assert made.digits.dtype == torch.int8 and torch.equal(made.digits, expected.digits)
    assert made.rows.shape == (head_rows + 1, rows) and torch.equal(made.rows, expected.rows)
    if shift <= 8 and codes.numel() > 1:
        assert int(made.digits.min()) == -128 and int(made.digits.max()) == 127


def test_one_digit_operands_reject_bad_arguments() -> None:
    codes = torch.zeros(3, 4, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="int64 codes"):
        one_digit_operands(codes.int(), 0, 0)
    with pytest.raises(ValueError, match="shift >= 0"):
        one_digit_operands(codes, -1, 0)
    with pytest.raises(ValueError, match=r"\(HEAD, 3\)"):
        one_digit_operands(codes, 0, 0, head=torch.zeros(2, 4, dtype=torch.int64))


def _terms(rows: int) -> dict[str, Term]:
    generator = torch.Generator().manual_seed(rows)
    beyond = torch.randint(1, 40, (rows,), generator=generator)
    beyond[::3] = 70  # rshr by more than 62 gives 0
    return {
        "per channel": Term(
            torch.randint(1, 2**20, (rows,), generator=generator),
            torch.randint(1, 40, (rows,), generator=generator), 0, (0, 0),
        ),
        "one channel": Term(torch.tensor([3]), torch.tensor([0]), 0, (0, 0)),
        "shared shift": Term(torch.tensor([12345]), torch.tensor([17]), 0, (0, 0)),
        "some beyond": Term(
            torch.randint(1, 2**20, (rows,), generator=generator), beyond, 0, (0, 0)
        ),
        "left shift": Term(torch.tensor([5]), torch.tensor([-3]), 0, (0, 0)),  # apply_term's
        "pre-shift": Term(torch.tensor([7]), torch.tensor([4]), 2, (0, 0)),  # apply_term's
    }  # fmt: skip


@pytest.mark.parametrize("name", list(_terms(1)))
@pytest.mark.parametrize(("add", "bounds"), [(0, ()), (-7, (-(2**30), 2**30)), (3, (-5, 9))])
def test_one_digit_operands_bias_terms_equal_apply_term(
    name: str, add: int, bounds: tuple[int, ...]
) -> None:
    rows, columns = 37, 11
    term = _terms(rows)[name]
    generator = torch.Generator().manual_seed(len(name))
    codes = torch.randint(-100, 100, (rows, columns), generator=generator).to(DEVICE)
    bias_codes = torch.randint(-(2**40), 2**40, (rows,), generator=generator).to(DEVICE)
    bias_codes[:3] = torch.tensor([0, 2**40, -(2**40)])
    bias = bias_term(bias_codes, term, add, *bounds)
    assert (bias.channels is None) == (name in ("left shift", "pre-shift"))
    made = one_digit_operands(codes, 0, 1, bias=bias)
    expected = apply_term(bias_codes, term) + add
    if bounds:
        expected = expected.clamp(*bounds)
    assert made.bias is not None and torch.equal(made.bias, expected.expand(rows))
    reference = one_digit_operands_reference(codes, 0, 1, bias=bias)
    assert reference.bias is not None and torch.equal(reference.bias, made.bias)
