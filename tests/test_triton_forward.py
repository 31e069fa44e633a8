"""The persistent Triton forward (kernels/triton/gru_forward.py) against nn.GRU.

Without a GPU the kernels run under TRITON_INTERPRET=1 on small shapes (one hidden tile per
batch tile: interpreted programs run one after another, so they cannot meet at a barrier);
on a GPU the multi-program grid with its barrier runs too, against cuDNN's own error.
"""

from __future__ import annotations

import importlib.util
import itertools
import os

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from quant_gru import QuantGRU
from quant_gru.kernels.backend import resolve
from quant_gru.kernels.torch.float_gru import gru_direction

from tolerance import assert_float_conformant, assert_ratio_to_reference

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel module is first imported
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

from quant_gru.kernels.triton.plans import Plan, row_plan, tile_plan  # noqa: E402

CASES = [
    dict(input_size=4, hidden_size=16, num_layers=1),
    dict(input_size=3, hidden_size=37, num_layers=2, bidirectional=True),
    dict(input_size=5, hidden_size=20, num_layers=1, batch_first=True, bias=False),
    dict(input_size=7, hidden_size=9, num_layers=2, batch_first=True, bidirectional=True),
    # Under the interpreter, too large for the single tile kernel: one tile re-reading R in
    # chunks every step. On a GPU, one row a program holding all of R (H up to 128).
    dict(input_size=3, hidden_size=80, num_layers=1),
]
if DEVICE.type == "cuda":
    # Several hidden tiles re-reading their R slices from L2 every step (twenty rows), or
    # handing the state over between row programs (six).
    CASES.append(dict(input_size=8, hidden_size=300, num_layers=1, bidirectional=True))


def pair(kwargs: dict, dtype: torch.dtype = torch.float32) -> tuple[QuantGRU, nn.GRU]:
    torch.manual_seed(0)
    model = QuantGRU(**kwargs).to(DEVICE, dtype)
    model.backend = "triton"
    return model, model.to_float().to(DEVICE, torch.float64)


def inputs(model: QuantGRU, batch: int, steps: int, dtype: torch.dtype) -> torch.Tensor:
    shape = (batch, steps) if model.batch_first else (steps, batch)
    return torch.randn(*shape, model.input_size, device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("kwargs", CASES)
@pytest.mark.parametrize(("batch", "steps"), [(1, 1), (3, 6), (70, 4)])
@pytest.mark.parametrize("with_hx", [False, True])
def test_matches_nn_gru(kwargs: dict, batch: int, steps: int, with_hx: bool) -> None:
    model, oracle = pair(kwargs)
    x = inputs(model, batch, steps, torch.float32)
    states = model.num_layers * model.num_directions
    hx = torch.randn(states, batch, model.hidden_size, device=DEVICE) if with_hx else None
    with torch.no_grad():
        out, h_n = model(x, hx)
        want, want_h = oracle(x.double(), None if hx is None else hx.double())
    assert_float_conformant(out, want, "output")
    assert_float_conformant(h_n, want_h, "h_n")


@pytest.mark.parametrize("kwargs", CASES[:2])
def test_packed_sequences(kwargs: dict) -> None:
    """Lengths are handled inside the kernel: unsorted, mixed, one of full length."""
    model, oracle = pair(kwargs)
    lengths = torch.tensor([5, 2, 7, 1, 7, 3])
    x = inputs(model, len(lengths), 7, torch.float32)
    packed = pack_padded_sequence(x, lengths, model.batch_first, enforce_sorted=False)
    with torch.no_grad():
        out, h_n = model(packed)
        want, want_h = oracle(
            pack_padded_sequence(x.double(), lengths, model.batch_first, enforce_sorted=False)
        )
    padded, _ = pad_packed_sequence(out, model.batch_first)
    want_padded, _ = pad_packed_sequence(want, model.batch_first)
    assert_float_conformant(padded, want_padded, "output")
    assert_float_conformant(h_n, want_h, "h_n")


@pytest.mark.parametrize("kernel", ["row", "tile"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("hidden", [5, 24])
def test_each_kernel_with_saved_gates(kernel: str, reverse: bool, hidden: int) -> None:
    """Each kernel forced on one direction: output, h_n and the gates saved for the backward
    (r, z, n, R_n h + b_n) against the plain recurrence, with mixed lengths."""
    from quant_gru.kernels.triton.gru_forward import gru_direction_forward

    torch.manual_seed(1)
    steps, batch, inputs_ = 6, 5, 3
    x = torch.randn(steps, batch, inputs_, device=DEVICE)
    h0 = torch.randn(batch, hidden, device=DEVICE)
    w_ih = torch.randn(3 * hidden, inputs_, device=DEVICE) * 0.5
    w_hh = torch.randn(3 * hidden, hidden, device=DEVICE) / hidden**0.5
    b_ih, b_hh = torch.randn(2, 3 * hidden, device=DEVICE) * 0.1
    lengths = torch.tensor([6, 2, 0, 5, 1], device=DEVICE)
    plan = {
        "row": lambda: row_plan(batch, hidden, DEVICE),
        "tile": lambda: tile_plan(batch, hidden, 4, DEVICE),
    }[kernel]()
    assert plan is not None and plan.rows == (kernel == "row")
    gates_x = torch.nn.functional.linear(x, w_ih, b_ih)
    saved = torch.zeros(steps, batch, 4 * hidden, device=DEVICE)
    with torch.no_grad():
        out, h_n = gru_direction_forward(gates_x, h0, w_hh, b_hh, lengths, reverse, saved, plan)
    args64 = [t.double() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
    want, want_h = gru_direction(*args64, lengths, reverse)
    assert_float_conformant(out, want, "output")
    assert_float_conformant(h_n, want_h, "h_n")
    # The saved gates of every valid step, recomputed from the reference's states.
    for b in range(batch):
        order = range(int(lengths[b]))
        order = reversed(order) if reverse else order
        h = args64[1][b]
        for t in order:
            gx = torch.nn.functional.linear(args64[0][t, b], args64[2], args64[4])
            gh = torch.nn.functional.linear(h, args64[3], args64[5])
            r = torch.sigmoid(gx[:hidden] + gh[:hidden])
            z = torch.sigmoid(gx[hidden : 2 * hidden] + gh[hidden : 2 * hidden])
            n = torch.tanh(gx[2 * hidden :] + r * gh[2 * hidden :])
            expected = torch.cat([r, z, n, gh[2 * hidden :]])
            assert_float_conformant(saved[t, b], expected, f"saved gates, row {b} step {t}")
            h = want[t, b]


@pytest.mark.parametrize("batch", [3, 20])
def test_custom_operator_matches_the_eager_path(batch: int) -> None:
    """The torch.library operator (what torch.compile records) and the eager path (the same
    kernels without the operator's dispatch) give identical outputs and gradients; the
    operator passes torch.library.opcheck's schema and fake-tensor checks."""
    from quant_gru.kernels.triton import ops

    torch.manual_seed(2)
    steps, hidden = 5, 12
    gates_x = torch.randn(steps, batch, 3 * hidden, device=DEVICE)
    h0 = torch.randn(batch, hidden, device=DEVICE)
    w_hh = torch.randn(3 * hidden, hidden, device=DEVICE) / hidden**0.5
    b_hh = torch.randn(3 * hidden, device=DEVICE) * 0.1
    lengths = torch.tensor(([5, 2, 4] * 7)[:batch], device=DEVICE, dtype=torch.int32)
    weight = torch.randn(steps, batch, hidden, device=DEVICE)

    def run(through_operator: bool) -> list[torch.Tensor]:
        leaves = [t.detach().clone().requires_grad_() for t in (gates_x, h0, w_hh, b_hh)]
        if through_operator:
            out, h_n, _ = ops.gru_direction(*leaves, lengths, True, True)
        else:
            out, h_n = ops.direction(*leaves, lengths, True, True)
        ((out * weight).sum() + h_n.square().sum()).backward()
        return [out.detach(), h_n.detach(), *(leaf.grad for leaf in leaves)]

    for a, b in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.library.opcheck(
        ops.gru_direction,
        (gates_x, h0, w_hh, b_hh, lengths, True, False),
        test_utils=("test_schema", "test_faketensor"),
    )


INTERPRETER_BF16 = pytest.mark.skipif(
    DEVICE.type != "cuda",
    reason="the Triton interpreter's bfloat16 tl.dot is wrong (errors of 1e10 on a plain "
    "16x16 product with triton 3.9); checked on the GPU",
)


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.bfloat16, marks=INTERPRETER_BF16), torch.float16]
)
def test_half_precision_within_twice_the_plain_path(dtype: torch.dtype) -> None:
    """16-bit inputs: error against float64 at most twice the plain path's at that dtype
    (on a GPU the plain path in bf16 uses cuBLAS as cuDNN does)."""
    model, oracle = pair(CASES[1], dtype)
    x = inputs(model, 5, 9, dtype)
    with torch.no_grad():
        out, _ = model(x)
        model.backend = "torch"
        plain, _ = model(x)
        exact, _ = oracle(x.double())
    assert out.dtype == dtype
    assert_ratio_to_reference(out, plain, exact, str(dtype))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="compares with cuDNN, on a GPU")
@pytest.mark.parametrize("precision", ["bfloat16", "float16", "float32", "tf32"])
@pytest.mark.parametrize(("batch", "hidden"), [(3, 96), (40, 160), (100, 160), (48, 512)])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradients_within_twice_cudnn(
    precision: str,
    batch: int,
    hidden: int,
    bidirectional: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Training against cuDNN's own error at the same precision: the output, h_n and the
    gradient of the input, h0 and every parameter, each against float64, at most twice
    cuDNN's error. Row kernels for 3 rows (all of R in one program) and for the forward at
    40 rows (programs of 64 units), tile kernels otherwise; under TF32 the tile forward splits
    the state at H=160 and rounds it at H=512. 'tf32' is float32 with torch's TF32 switches
    on, for cuDNN and us alike; 'float32' has them off."""
    tf32 = precision == "tf32"
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    dtype = torch.float32 if tf32 else getattr(torch, precision)
    kwargs = dict(input_size=24, hidden_size=hidden, num_layers=2, bidirectional=bidirectional)
    model, oracle = pair(kwargs, dtype)
    cudnn = model.to_float().to(DEVICE, dtype)
    x = inputs(model, batch, 50, dtype)
    states = model.num_layers * model.num_directions
    hx = torch.randn(states, batch, hidden, device=DEVICE, dtype=dtype)
    weight = torch.randn(50, batch, model.num_directions * hidden, device=DEVICE)

    def run(module: nn.Module, precision: torch.dtype) -> list[torch.Tensor]:
        x_ = x.detach().to(precision).requires_grad_()
        hx_ = hx.detach().to(precision).requires_grad_()
        out, h_n = module(x_, hx_)
        ((out.double() * weight.double()).sum() + h_n.double().square().sum()).backward()
        grads = [p.grad for p in module.parameters()]
        return [out.detach(), h_n.detach(), x_.grad, hx_.grad, *grads]

    ours, theirs, exact = run(model, dtype), run(cudnn, dtype), run(oracle, torch.float64)
    names = ["output", "h_n", "input grad", "hx grad"] + [n for n, _ in model.named_parameters()]
    for name, a, b, e in zip(names, ours, theirs, exact, strict=True):
        assert_ratio_to_reference(a, b, e, f"{precision} {name}")


@pytest.mark.skipif(DEVICE.type != "cuda", reason="programs wait for each other on a GPU only")
def test_row_kernel_handover_under_stress() -> None:
    """The row kernel's tagged handover with many programs a row (up to 128 in the grid),
    odd and even sizes, both directions and 40 steps, twice over: a program that used a word
    from the step before (the replicated-copy race sync._every_thread closes) shows here."""
    from quant_gru.kernels.triton.gru_forward import gru_direction_forward

    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    for _, hidden, batch, reverse, block_h in itertools.product(
        range(2), [37, 64, 128], [3, 12], [False, True], [4, 8, 16]
    ):
        if batch * -(-hidden // block_h) > sms:  # every program must be resident
            continue
        torch.manual_seed(hidden + batch)
        x = torch.randn(40, batch, 3, device=DEVICE)
        h0 = torch.randn(batch, hidden, device=DEVICE)
        w_ih = torch.randn(3 * hidden, 3, device=DEVICE)
        w_hh = torch.randn(3 * hidden, hidden, device=DEVICE) / hidden**0.5
        b_ih, b_hh = torch.randn(2, 3 * hidden, device=DEVICE)
        gates_x = torch.nn.functional.linear(x, w_ih, b_ih)
        full = max(16, 1 << (hidden - 1).bit_length())
        plan = Plan(rows=True, block_b=1, block_h=block_h, block_k=full, warps=4)
        out, h_n = gru_direction_forward(gates_x, h0, w_hh, b_hh, None, reverse, None, plan)
        want, want_h = gru_direction(
            *(t.double() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)), None, reverse
        )
        what = f"H={hidden} B={batch} reverse={reverse} block_h={block_h}"
        assert_float_conformant(out, want, what)
        assert_float_conformant(h_n, want_h, what)


# For H = 24 (32 padded), batch 20.
TILE_PLANS = {
    "single": Plan(False, 16, 32, 32, 4, resident=True, single=True),  # forward only
    "resident, chunks of 16": Plan(False, 16, 32, 16, 4, resident=True),
    "resident, one chunk": Plan(False, 16, 32, 32, 4, resident=True),
    "streamed": Plan(False, 16, 32, 16, 4, resident=False),
    # Over gru_backward.PREFETCH_ELEMENTS: the backward loads its step inputs in the step.
    "streamed, 32-row tiles": Plan(False, 32, 32, 16, 4, resident=False),
}
if DEVICE.type == "cuda":  # several hidden tiles meeting at the barrier
    TILE_PLANS["resident, 3 hidden tiles"] = Plan(False, 16, 8, 16, 4, resident=True)
    TILE_PLANS["streamed, 3 hidden tiles"] = Plan(False, 32, 8, 16, 4, resident=False)


@pytest.mark.parametrize("layout", TILE_PLANS)
@pytest.mark.parametrize("tf32", [False, True])
def test_tile_kernel_layouts(layout: str, tf32: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each way the tile kernel holds R (whole state in one program, on chip in K chunks,
    re-read every step) on packed lengths in both directions. Under TF32 the state enters
    the products split in two rounded parts (products.py: H=24 is below SPLIT_BELOW_HIDDEN),
    so the forward is float32-accurate
    against a float64 GRU whose R is rounded to TF32 as the kernel's is."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    check_forward_plan(TILE_PLANS[layout], layout, rounded=tf32)


def check_forward_plan(plan: Plan, what: str, rounded: bool) -> None:
    """The forward under ``plan`` on packed lengths in both directions against a float64 GRU
    (whose R is rounded to TF32 when the kernel's is, ``rounded``)."""
    from quant_gru.kernels.triton.gru_forward import gru_direction_forward
    from quant_gru.kernels.triton.products import rounded_to_tf32

    torch.manual_seed(1)
    hidden, batch = 24, 20
    x = torch.randn(6, batch, 3, device=DEVICE)
    h0 = torch.randn(batch, hidden, device=DEVICE)
    w_ih = torch.randn(3 * hidden, 3, device=DEVICE)
    w_hh = torch.randn(3 * hidden, hidden, device=DEVICE) / hidden**0.5
    b_ih, b_hh = torch.randn(2, 3 * hidden, device=DEVICE)
    lengths = torch.randint(0, 7, (batch,), device=DEVICE)
    # Made in float64: under TF32 the input projection's GEMM would add TF32 error of its own.
    gates_x = torch.nn.functional.linear(x.double(), w_ih.double(), b_ih.double()).float()
    w_exact = rounded_to_tf32(w_hh) if rounded else w_hh
    for reverse in (False, True):
        out, h_n = gru_direction_forward(gates_x, h0, w_hh, b_hh, lengths, reverse, None, plan)
        want, want_h = gru_direction(
            *(t.double() for t in (x, h0, w_ih, w_exact, b_ih, b_hh)), lengths, reverse
        )
        assert_float_conformant(out, want, f"{what} reverse={reverse}")
        assert_float_conformant(h_n, want_h, f"{what} reverse={reverse}")


@pytest.mark.parametrize("layout", [name for name in TILE_PLANS if name != "single"])
def test_backward_tile_layouts(layout: str) -> None:
    """The backward tile kernel with R's columns re-read every step or kept on chip in K
    chunks, and with each step's inputs loaded a step ahead or not, on packed lengths in both
    directions, against autograd through the plain recurrence in float64: the gradients of
    the input projections, of h0 and (summed over steps and rows) of R_n h + b_n, which is
    b_hh's n part."""
    plan = TILE_PLANS[layout]
    check_backward_plan(plan, plan, layout)


def check_backward_plan(forward: Plan, backward: Plan, what: str) -> None:
    """The backward under ``backward`` (after the forward under ``forward``) on packed
    lengths in both directions against autograd through the float64 recurrence."""
    from quant_gru.kernels.triton.gru_backward import gru_direction_backward
    from quant_gru.kernels.triton.gru_forward import gru_direction_forward

    torch.manual_seed(2)
    steps, batch, hidden = 6, 20, 24
    gates_x = torch.randn(steps, batch, 3 * hidden, device=DEVICE)
    h0 = torch.randn(batch, hidden, device=DEVICE)
    w_hh = torch.randn(3 * hidden, hidden, device=DEVICE) / hidden**0.5
    b_hh = torch.randn(3 * hidden, device=DEVICE)
    lengths = torch.randint(0, steps + 1, (batch,), device=DEVICE)
    lengths32 = lengths.to(torch.int32)
    grad_out = torch.randn(steps, batch, hidden, device=DEVICE)
    grad_h_n = torch.randn(batch, hidden, device=DEVICE)
    eye = torch.eye(3 * hidden, device=DEVICE, dtype=torch.float64)
    for reverse in (False, True):
        saved = torch.empty(steps, batch, 4 * hidden, device=DEVICE)
        out, _ = gru_direction_forward(gates_x, h0, w_hh, b_hh, lengths, reverse, saved, forward)
        grad_gx, grad_h0, grad_ghn = gru_direction_backward(
            grad_out, grad_h_n, out, h0, saved, w_hh, lengths32, reverse, torch.float32, backward
        )
        x64, h64, b64 = (t.double().requires_grad_() for t in (gates_x, h0, b_hh))
        want, want_h = gru_direction(x64, h64, eye, w_hh.double(), None, b64, lengths, reverse)
        ((want * grad_out.double()).sum() + (want_h * grad_h_n.double()).sum()).backward()
        case = f"{what} reverse={reverse}"
        assert_float_conformant(grad_gx, x64.grad, f"input projections' grad, {case}")
        assert_float_conformant(grad_h0, h64.grad, f"h0 grad, {case}")
        assert_float_conformant(grad_ghn.sum((0, 1)), b64.grad[2 * hidden :], f"b_hn grad, {case}")


# For H = 24 (32 padded): (forward plan, backward plan). The tagged backward holds R's
# columns of its units over padded 3H = 128 rows, the single one 3 blocks of 32.
ROW_PLANS = {
    "single": (Plan(True, 1, 32, 32, 4, single=True), Plan(True, 1, 32, 32, 4, single=True)),
    "tagged, one hidden tile": (Plan(True, 1, 32, 32, 4), Plan(True, 1, 32, 128, 4)),
}
if DEVICE.type == "cuda":  # several hidden tiles handing the state over
    ROW_PLANS["tagged, 3 hidden tiles"] = (Plan(True, 1, 8, 32, 4), Plan(True, 1, 8, 128, 4))
    # The forward's wide plans: several rows a program (the backward takes one).
    ROW_PLANS["tagged, 2 rows, 3 hidden tiles"] = (
        Plan(True, 2, 8, 32, 4),
        Plan(True, 1, 8, 128, 4),
    )
    ROW_PLANS["tagged, 2 rows, 1 hidden tile"] = (
        Plan(True, 2, 32, 32, 4),
        Plan(True, 1, 32, 128, 4),
    )


@pytest.mark.parametrize("layout", ROW_PLANS)
def test_row_kernel_layouts(layout: str) -> None:
    """The row kernels, holding all of R (the state stays in the program) or handing the
    state over in tagged words, forward and backward, on packed lengths in both directions.
    Their products are float32 on the CUDA cores, so they are exact even under TF32."""
    forward, backward = ROW_PLANS[layout]
    check_forward_plan(forward, layout, rounded=False)
    check_backward_plan(forward, backward, layout)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="waves of programs exist on a GPU only")
def test_rows_holding_all_of_r_in_two_waves() -> None:
    """More rows than SMs, each row's program holding all of R: the rows past the first wave
    run after it (those programs never wait for each other), forward and backward, packed,
    both directions, against nn.GRU in float64."""
    from quant_gru.kernels.triton.plans import forward_plan

    batch = torch.cuda.get_device_properties(DEVICE).multi_processor_count + 37
    plan = forward_plan(batch, 100, 4, DEVICE)
    assert plan.rows and plan.single
    model, oracle = pair(dict(input_size=5, hidden_size=100, num_layers=1, bidirectional=True))
    x = inputs(model, batch, 6, torch.float32).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    lengths = torch.randint(1, 7, (batch,))
    outputs = [
        module(pack_padded_sequence(feed, lengths, enforce_sorted=False))
        for module, feed in ((model, x), (oracle, x64))
    ]
    for out, h_n in outputs:
        (out.data.square().sum() + h_n.sum()).backward()
    (ours, ours_h), (want, want_h) = outputs
    assert_float_conformant(ours.data, want.data, "output")
    assert_float_conformant(ours_h, want_h, "h_n")
    assert_float_conformant(x.grad, x64.grad, "input grad")
    for (name, mine), (_, theirs) in zip(
        model.named_parameters(), oracle.named_parameters(), strict=True
    ):
        assert_float_conformant(mine.grad, theirs.grad, name)


@pytest.mark.parametrize("kernel", ["row", "tile"])
def test_forward_hands_the_backward_r_rounded_to_tf32(
    kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training forward under TF32 writes R rounded to TF32 for the tile backward: the row
    kernel from its registers, the tile kernel where it rounds R for itself. Bit for bit the
    host's rounding, and the backward given it computes what it computes rounding R itself."""
    from quant_gru.kernels.triton.gru_backward import gru_direction_backward
    from quant_gru.kernels.triton.gru_forward import gru_direction_forward
    from quant_gru.kernels.triton.products import rounded_to_tf32

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    torch.manual_seed(3)
    steps, batch, hidden = 4, 3, 10
    gates_x = torch.randn(steps, batch, 3 * hidden, device=DEVICE)
    w_hh = torch.randn(3 * hidden, hidden, device=DEVICE) / hidden**0.5
    b_hh = torch.randn(3 * hidden, device=DEVICE) * 0.1
    plan = (
        row_plan(batch, hidden, DEVICE) if kernel == "row" else tile_plan(batch, hidden, 4, DEVICE)
    )
    assert plan is not None and plan.rows == (kernel == "row")
    saved = torch.empty(steps, batch, 4 * hidden, device=DEVICE)
    rounded = torch.full_like(w_hh, float("nan"))
    out, _ = gru_direction_forward(
        gates_x, None, w_hh, b_hh, None, False, saved, plan, rounded=rounded
    )
    assert torch.equal(rounded, rounded_to_tf32(w_hh))
    assert not torch.equal(rounded, w_hh)  # the rounding did something
    grad_out = torch.randn_like(out)
    arguments = (grad_out, None, out, None, saved, w_hh, None, False, out.dtype)
    backward = tile_plan(batch, hidden, 4, DEVICE)
    given = gru_direction_backward(*arguments, backward, rounded=rounded)
    own = gru_direction_backward(*arguments, backward)
    for mine, theirs in zip(given, own, strict=True):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("batch", [3, 20])  # the row kernels, the tile kernels
@pytest.mark.parametrize("batch_first", [False, True])
def test_backward_reads_the_output_gradient_with_any_strides(batch: int, batch_first: bool) -> None:
    """The output's gradient as losses hand it over, read in place: a sum's (expanded, stride
    0 everywhere) and, batch-first, one transposed into the kernels' time-major order."""
    model, oracle = pair(dict(input_size=4, hidden_size=12, batch_first=batch_first))
    x = inputs(model, batch, 5, torch.float32).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    out, _ = model(x)
    want, _ = oracle(x64)
    out.sum().backward(retain_graph=True)
    want.sum().backward(retain_graph=True)
    assert_float_conformant(x.grad, x64.grad, "input grad, expanded output gradient")
    weight = torch.randn(out.shape, device=DEVICE)
    for tensor in (x, x64, *model.parameters(), *oracle.parameters()):
        tensor.grad = None
    (out * weight).sum().backward()
    (want * weight.double()).sum().backward()
    assert_float_conformant(x.grad, x64.grad, "input grad, output gradient as the output")
    for (name, mine), (_, theirs) in zip(
        model.named_parameters(), oracle.named_parameters(), strict=True
    ):
        assert_float_conformant(mine.grad, theirs.grad, name)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the limit exists on a GPU only")
def test_batch_beyond_one_launch() -> None:
    """More rows than one launch takes (64 a program, one program per SM): the batch runs in
    slices, forward and backward, and still matches nn.GRU."""
    from quant_gru.kernels.triton.plans import batch_limit

    limit = batch_limit(DEVICE)
    assert limit is not None
    model, oracle = pair(dict(input_size=4, hidden_size=8, num_layers=1, bidirectional=True))
    x = inputs(model, limit + 5, 3, torch.float32).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    out, h_n = model(x)
    want, want_h = oracle(x64)
    (out.square().sum() + h_n.sum()).backward()
    (want.square().sum() + want_h.sum()).backward()
    assert_float_conformant(out, want, "output")
    assert_float_conformant(h_n, want_h, "h_n")
    assert_float_conformant(x.grad, x64.grad, "input grad")


def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    model = QuantGRU(3, 8)
    assert model.backend == "auto"
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'triton', 'torch'"):
        model.backend = "cuda"
    x = torch.randn(4, 2, 3)
    model.backend = "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="the input is on cpu and the Triton kernels run on"):
        model(x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with torch.no_grad(), pytest.raises(RuntimeError, match="take float32, bfloat16, float16"):
        model.double()(x.double())
    model.backend = "auto"
    assert resolve("auto", x) == "torch"  # the interpreter serves forced 'triton' only
    monkeypatch.setenv("QUANT_GRU_BACKEND", "fast")
    with pytest.raises(ValueError, match="QUANT_GRU_BACKEND must be one of"):
        model(x.double())


def test_environment_selects_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """QUANT_GRU_BACKEND=triton forces the kernels for modules left at 'auto'."""
    model = QuantGRU(3, 8).to(DEVICE)
    x = torch.randn(4, 2, 3, device=DEVICE)
    monkeypatch.setenv("TRITON_INTERPRET", "0" if DEVICE.type == "cuda" else "1")
    monkeypatch.setenv("QUANT_GRU_BACKEND", "triton")
    with torch.no_grad():
        out, _ = model(x)
    monkeypatch.setenv("QUANT_GRU_BACKEND", "torch")
    with torch.no_grad():
        plain, _ = model(x)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("batch", [6, 20])
def test_gradients_without_hx_or_final_state(packed: bool, batch: int) -> None:
    """No hx and a loss on the output alone: the kernels start from zeros and take h_n's
    gradient as zeros without tensors of zeros made for them, and the recurrent weights'
    gradient leaves out the first step's (zero) state, in both directions of two layers."""
    model, oracle = pair(dict(input_size=3, hidden_size=37, num_layers=2, bidirectional=True))
    steps = 7
    x = inputs(model, batch, steps, torch.float32).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    lengths = torch.tensor([7, 2, 5, 1, 7, 4] * 4)[:batch]
    feed, feed64 = x, x64
    if packed:
        feed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        feed64 = pack_padded_sequence(x64, lengths, enforce_sorted=False)
    outputs = [model(feed)[0], oracle(feed64)[0]]
    data = [o.data if packed else o for o in outputs]
    weight = torch.randn(data[0].shape, device=DEVICE)
    (data[0] * weight).sum().backward()
    (data[1] * weight.double()).sum().backward()
    assert_float_conformant(data[0], data[1], "output")
    assert_float_conformant(x.grad, x64.grad, "input grad")
    for (name, ours), (_, theirs) in zip(
        model.named_parameters(), oracle.named_parameters(), strict=True
    ):
        assert_float_conformant(ours.grad, theirs.grad, name)


@pytest.mark.parametrize("kwargs", CASES)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("batch", [6, 20])
def test_gradients_match_nn_gru(kwargs: dict, packed: bool, batch: int) -> None:
    """Training through the kernels: the input's, h0's and every parameter's gradient. Six rows
    take the row kernels; twenty the tile kernels under the interpreter and where H > 128 on
    a GPU, else the row kernels holding all of R (plans.ROW_KERNEL_MAX_BATCH)."""
    from quant_gru.kernels.triton.plans import ROW_KERNEL_MAX_BATCH

    assert (batch <= ROW_KERNEL_MAX_BATCH) == (batch == 6)
    model, oracle = pair(kwargs)
    steps = 7
    x = inputs(model, batch, steps, torch.float32).requires_grad_()
    states = model.num_layers * model.num_directions
    hx = torch.randn(states, batch, model.hidden_size, device=DEVICE).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    hx64 = hx.detach().double().requires_grad_()
    lengths = torch.tensor([7, 2, 5, 1, 7, 4] * 4)[:batch]
    if packed:
        feed = pack_padded_sequence(x, lengths, model.batch_first, enforce_sorted=False)
        feed64 = pack_padded_sequence(x64, lengths, model.batch_first, enforce_sorted=False)
    else:
        feed, feed64 = x, x64
    weight = torch.randn(steps * batch * model.num_directions * model.hidden_size, device=DEVICE)

    def loss(output, h_n):
        data = output.data if packed else output
        flat = data.flatten()
        return (flat * weight[: flat.numel()].to(flat.dtype)).sum() + h_n.square().sum()

    loss(*model(feed, hx)).backward()
    loss(*oracle(feed64, hx64)).backward()
    assert_float_conformant(x.grad, x64.grad, "input grad")
    assert_float_conformant(hx.grad, hx64.grad, "hx grad")
    for (name, ours), (_, theirs) in zip(
        model.named_parameters(), oracle.named_parameters(), strict=True
    ):
        assert_float_conformant(ours.grad, theirs.grad, name)


def test_sequences_past_the_kernels_int32_offsets_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kernels address (T, B, width) tensors with int32 offsets: past 2^31 elements (here
    a limit lowered to 200) a forward or backward says so instead of overflowing, and shorter
    sequences run."""
    from quant_gru.kernels.triton import plans

    monkeypatch.setattr(plans, "INDEX_LIMIT", 200)
    model = QuantGRU(4, 8).to(DEVICE)
    model.backend = "triton"
    with torch.no_grad():
        model(torch.randn(2, 2, 4, device=DEVICE))  # 2 * 2 * 3H = 96 elements
        with pytest.raises(ValueError, match=r"2\^31 elements a tensor"):
            model(torch.randn(5, 2, 4, device=DEVICE))  # 240
    x = torch.randn(3, 2, 4, device=DEVICE, requires_grad=True)  # saved: 3 * 2 * 4H = 192
    out, _ = model(x)
    with pytest.raises(ValueError, match=r"split the sequence into chunks"):
        model(torch.randn(4, 2, 4, device=DEVICE, requires_grad=True))  # 256
    out.sum().backward()
    assert x.grad is not None


def _nearest_tf32(x: torch.Tensor) -> torch.Tensor:
    """float64 values rounded to 11 significant bits (TF32's), to nearest, ties to even."""
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(torch.round(mantissa * 2.0**11), exponent - 11)


def _half_exponent(bound: float) -> int:
    """The power of two that brings ``bound`` into [2^14, 2^15), within +-112 (the largest
    for zero or a subnormal bound)."""
    if bound < 2.0**-126:
        return 112
    found = 15 - torch.frexp(torch.tensor(bound, dtype=torch.float64)).exponent.item()
    return max(-112, min(112, found))


@pytest.mark.parametrize("w_scale", [1.0, 1e-3, 4e4, 1e-20, 0.0])
def test_scaled_half_weights(w_scale: float) -> None:
    """products.scaled_half against its definition: each row's largest magnitude brought into
    [2^14, 2^15) by its own power of two 2^k (k within +-112; the largest for a zero row), R
    as float16 of R * 2^k, bit for bit; nothing reaches float16's infinity; kept while R is
    unmodified, remade after an in-place change. Rows of very different sizes (one zero, one
    10^30 times the others) each keep their own scale."""
    from quant_gru.kernels.triton.products import scaled_half

    torch.manual_seed(3)
    w = (torch.randn(48, 16, device=DEVICE) * w_scale).contiguous()
    w[0, :4] = torch.tensor([1e-9, -3e-7, 5e-5, 0.0]) * w_scale  # float16 subnormals once scaled
    w[1] = 0.0
    w[2] *= 1e30 if w_scale < 1 else 1e-30
    for _ in range(2):
        half, scales = scaled_half(w)
        k = torch.tensor([_half_exponent(b) for b in w.abs().amax(dim=1).tolist()])
        want = torch.stack([2.0**k, 2.0**-k]).float()
        assert torch.equal(scales.cpu(), want)
        assert half.dtype == torch.float16
        assert torch.equal(half.cpu(), (w.double().cpu() * 2.0 ** k[:, None]).float().half())
        assert half.float().abs().max() < 2**15
        assert scaled_half(w)[0] is half
        with torch.no_grad():
            w.mul_(3.0)


@pytest.mark.parametrize("layout", TILE_PLANS)
@pytest.mark.parametrize("h0_scale", [None, 3.0, "rows apart"])
def test_tf32_half_forward_step_by_step(
    layout: str, h0_scale: float | str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TF32 forward with scaled float16 operands (products.TF32_HALF, taken here at H=24
    by moving products.SPLIT_BELOW_HIDDEN), step by step: each step's state, row by row,
    against a float64 step from the kernel's own previous state, whose product takes the
    state and R rounded to TF32's 11 significant bits (to nearest, ties to even) and whose
    z * h takes the state as it is. The float32 rung: the kernel's products are those of the
    rounded values, summed in float32. Initial states beyond 1 in magnitude scale their row's
    operand down; rows of R and of h0 from 10^-6 to 10^4 times the others each keep their
    precision. Packed lengths from 0 to T."""
    from quant_gru.kernels.triton import products
    from quant_gru.kernels.triton.gru_forward import gru_direction_forward

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    monkeypatch.setattr(products, "SPLIT_BELOW_HIDDEN", 0)
    plan = TILE_PLANS[layout]
    torch.manual_seed(4)
    steps, batch, hidden = 6, 20, 24
    gates_x = torch.randn(steps, batch, 3 * hidden, device=DEVICE)
    w_hh = torch.randn(3 * hidden, hidden, device=DEVICE) / hidden**0.5
    h0 = None
    if h0_scale is not None:
        h0 = torch.randn(batch, hidden, device=DEVICE)
        if h0_scale == "rows apart":
            h0 *= torch.logspace(-6, 4, batch, device=DEVICE)[:, None]
            w_hh[::7] *= 1e4
            w_hh[3::7] *= 1e-6
        else:
            h0 *= h0_scale
    b_hh = torch.randn(3 * hidden, device=DEVICE)
    lengths = torch.randint(0, steps + 1, (batch,), device=DEVICE)
    lengths[:2] = torch.tensor([0, steps])
    for reverse in (False, True):
        out, h_n = gru_direction_forward(gates_x, h0, w_hh, b_hh, lengths, reverse, None, plan)
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        previous = torch.zeros(batch, hidden, dtype=torch.float64) if h0 is None else h0.double()
        previous = previous.cpu()
        r_all = _nearest_tf32(w_hh.double().cpu())
        for t in order:
            gx = gates_x[t].double().cpu()
            gh = _nearest_tf32(previous) @ r_all.T + b_hh.double().cpu()
            r = torch.sigmoid(gx[:, :hidden] + gh[:, :hidden])
            z = torch.sigmoid(gx[:, hidden : 2 * hidden] + gh[:, hidden : 2 * hidden])
            n = torch.tanh(gx[:, 2 * hidden :] + r * gh[:, 2 * hidden :])
            want = (1 - z) * n + z * previous
            for b in range(batch):
                what = f"{layout} reverse={reverse} step {t} row {b}"
                if t < lengths[b]:
                    assert_float_conformant(out[t, b], want[b], what)
                    previous[b] = out[t, b].double().cpu()
                else:  # past the row's length: zeros out, the state kept
                    assert torch.equal(out[t, b].cpu(), torch.zeros(hidden)), what
        assert_float_conformant(h_n, previous, f"{layout} reverse={reverse} h_n")


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1e30])
def test_tf32_half_rows_are_independent(bad: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under products.TF32_HALF an initial state that is not finite, or huge, in one batch
    row leaves every other row's outputs as they are, bit for bit: each row has its own
    scale."""
    from quant_gru.kernels.triton import products
    from quant_gru.kernels.triton.gru_forward import gru_direction_forward

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    monkeypatch.setattr(products, "SPLIT_BELOW_HIDDEN", 0)
    torch.manual_seed(5)
    steps, batch, hidden = 5, 20, 24
    gates_x = torch.randn(steps, batch, 3 * hidden, device=DEVICE)
    w_hh = torch.randn(3 * hidden, hidden, device=DEVICE) / hidden**0.5
    b_hh = torch.randn(3 * hidden, device=DEVICE)
    h0 = torch.randn(batch, hidden, device=DEVICE)
    plan = TILE_PLANS["resident, one chunk"]
    out, h_n = gru_direction_forward(gates_x, h0, w_hh, b_hh, None, False, None, plan)
    h0[0, 3] = bad
    out_bad, h_n_bad = gru_direction_forward(gates_x, h0, w_hh, b_hh, None, False, None, plan)
    assert torch.equal(out_bad[:, 1:], out[:, 1:])
    assert torch.equal(h_n_bad[1:], h_n[1:])
