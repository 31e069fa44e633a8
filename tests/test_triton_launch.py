"""The kernels' launcher (kernels/triton/launch.py): its key tells apart everything Triton
specializes on, a known key launches the remembered kernel with the arguments in the kernel's
parameter order, and on a GPU its launches compute what Triton's own launch computes."""

from __future__ import annotations

import os
import types

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported
pytest.importorskip("triton")

from quant_gru.kernels.triton import launch
from quant_gru.kernels.triton.launch import Launcher, argument_key


def test_key_tells_apart_what_triton_specializes_on():
    storage = torch.zeros(64)
    aligned, shifted = storage[:8], storage[1:9]  # 4 bytes past a 16-byte boundary
    assert argument_key(aligned) != argument_key(shifted)
    assert argument_key(aligned) != argument_key(aligned.to(torch.float16))
    assert argument_key(storage[4:12]) == argument_key(aligned)  # 16 bytes on: aligned
    keys = {argument_key(n) for n in (1, 16, 17, 2**31)}
    assert len(keys) == 4  # one, a multiple of 16, neither, past int32
    assert argument_key(3) == argument_key(5)
    assert argument_key(True) != argument_key(1)
    assert argument_key(None) is not None  # a known kind: Triton makes it a constant
    assert argument_key(1.5) == argument_key(-0.0)  # floats: not specialized on their value
    assert argument_key(1.5) != argument_key(1e300)  # but kept apart past float32's range
    assert argument_key("text") is None  # unknown: Triton's own launch path


def test_launch_key_tells_apart_what_argument_key_does():
    """The launcher's key (tensors and ints made inline) tells two argument lists apart exactly
    where argument_key tells an argument apart."""
    storage = torch.zeros(64)
    samples = [
        storage[:8], storage[1:9], storage[4:12], storage[:8].half(),
        torch.nn.Parameter(torch.zeros(8)), 1, 3, 5, 16, 17, 2**31, -16, True, None, 1.5, 1e300,
    ]  # fmt: skip
    for first in samples:
        for second in samples:
            same_part = argument_key(first) == argument_key(second)
            keys = [Launcher._key(0, [7, a, storage], {"A": 1}, 4, None) for a in (first, second)]
            assert (keys[0] == keys[1]) == same_part, (first, second)
    assert Launcher._key(0, ["text"], {}, 4, None) is None


class _FakeCompiled:
    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.launches = []

    def launch_metadata(self, grid, stream, *values):
        return ("metadata", grid)

    def run(self, *values):
        self.launches.append(values)


class _FakeKernel:
    """A jit function of parameters (x, n, A, B): Triton's launch through __getitem__."""

    arg_names = ("x", "n", "A", "B")

    def __init__(self):
        self.jit_launches = []
        self.compiled = []

    def __getitem__(self, grid):
        def run(*arguments, num_warps, **constants):
            self.jit_launches.append((grid, arguments, constants, num_warps))
            self.compiled.append(_FakeCompiled())
            return self.compiled[-1]

        return run


@pytest.fixture
def compiled_mode(monkeypatch):
    """The launcher as on a GPU: not interpreted, with a stand-in driver and device."""
    monkeypatch.setattr(launch, "interpreted", lambda: False)
    active = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda d: 7)
    monkeypatch.setattr(launch, "driver", types.SimpleNamespace(active=active))


def test_a_known_key_launches_the_remembered_kernel(compiled_mode):
    kernel = _FakeKernel()
    launcher = Launcher(kernel)
    x = torch.zeros(32)
    # constants given in another order than the kernel's parameters
    launcher((2, 3), (x, 5), {"B": False, "A": 4}, 2)
    launcher((2, 3), (x, 7), {"B": False, "A": 4}, 2)
    assert len(kernel.jit_launches) == 1
    (values,) = kernel.compiled[0].launches
    assert values[:4] == (2, 3, 1, 7)  # grid, then the stream
    assert values[-4:] == (x, 7, 4, False)  # arguments, then constants in parameter order
    assert values[6] == ("metadata", (2, 3, 1))


@pytest.mark.parametrize(
    "change",
    [
        lambda x, n, c, w: (x[1:], n, c, w),  # a pointer off its 16-byte alignment
        lambda x, n, c, w: (x.half(), n, c, w),
        lambda x, n, c, w: (x, 1, c, w),  # an integer Triton specializes as a constant
        lambda x, n, c, w: (x, 32, c, w),  # a multiple of 16
        lambda x, n, c, w: (x, n, {**c, "A": 8}, w),
        lambda x, n, c, w: (x, n, c, 4),
    ],
)
def test_anything_triton_specializes_on_compiles_again(compiled_mode, change):
    kernel = _FakeKernel()
    launcher = Launcher(kernel)
    x, constants = torch.zeros(32), {"A": 4, "B": False}
    launcher((1, 1), (x, 5), constants, 2)
    x2, n2, constants2, warps2 = change(x, 5, constants, 2)
    launcher((1, 1), (x2, n2), constants2, warps2)
    assert len(kernel.jit_launches) == 2
    assert not kernel.compiled[0].launches


def test_unknown_arguments_take_tritons_path_every_time(compiled_mode):
    kernel = _FakeKernel()
    launcher = Launcher(kernel)
    for _ in range(2):
        launcher((1, 1), (torch.zeros(4), "text"), {"A": 1, "B": True}, 2)
    assert len(kernel.jit_launches) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="launches on a GPU")
def test_remembered_launches_compute_what_tritons_launch_computes():
    from quant_gru.kernels.triton.gru_forward import gru_direction_forward

    torch.manual_seed(0)
    hidden, batch, steps = 96, 5, 7
    w_hh = torch.randn(3 * hidden, hidden, device="cuda") * 0.1
    b_hh = torch.randn(3 * hidden, device="cuda") * 0.1
    storage = torch.randn(steps * batch * 3 * hidden + 1, device="cuda")
    results = []
    # Aligned, aligned again (the remembered kernel), then 4 bytes off (compiled again).
    for offset in (0, 0, 1):
        gates_x = storage[offset : offset + steps * batch * 3 * hidden].view(steps, batch, -1)
        results.append(gru_direction_forward(gates_x.clone(), None, w_hh, b_hh, None, False))
        shifted = gru_direction_forward(gates_x, None, w_hh, b_hh, None, False)
        assert all(torch.equal(a, b) for a, b in zip(results[-1], shifted, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1], strict=True))


def test_integer_kernels_launch_with_every_constexpr_named(monkeypatch):
    """Every launch of the integer path (inference of two layers, and a QAT step with its
    weights updated after it) gives the launcher every runtime parameter in order and every
    constexpr by name (its condition for remembering the compiled kernel), on the row and on
    the tile kernel (interpreted here: the launches still pass through the launcher)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from quant_gru import QuantGRU
    from quant_gru.kernels.triton import (
        gru_backward,
        integer_gru,
        integer_projection,
        qat_input,
        weight_operands,
        weight_points,
    )

    seen = []
    real_call = Launcher.__call__

    def recording(self, grid, arguments, constants, warps, stages=None):
        seen.append((self._kernel, len(arguments), set(constants)))
        return real_call(self, grid, arguments, constants, warps, stages)

    monkeypatch.setattr(Launcher, "__call__", recording)
    torch.manual_seed(0)
    model = QuantGRU(8, 8, num_layers=2).to(device)
    model.calibrating = True
    with torch.no_grad():
        model(torch.randn(3, 2, 8, device=device))
    model.calibrating = False
    model.use_quantization = True
    model.backend = "triton"
    for row_plans in (True, False):
        if not row_plans:
            monkeypatch.setattr(integer_gru, "row_plan_for", lambda *arguments: None)
        x = torch.randn(3, 2, 8, device=device)
        with torch.no_grad():
            model(x)
        model(x.requires_grad_())[0].sum().backward()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(1.01)
    launchers = (
        integer_gru._launch_rows, integer_gru._launch_tiles, integer_projection._launch_quantize,
        integer_projection._launch_requantize, integer_projection._launch_projection,
        qat_input._launch, weight_points._launch_kernel, weight_operands._launch_kernel,
        gru_backward._launch_rows,
    )  # fmt: skip
    kernels = {launcher._kernel for launcher in launchers}
    launches = [entry for entry in seen if entry[0] in kernels]
    assert {entry[0] for entry in launches} == kernels
    for kernel, runtime, constants in seen:
        assert set(kernel.arg_names[runtime:]) == constants
