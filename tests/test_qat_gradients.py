"""QAT gradients: the float GRU's gradients evaluated at the quantized forward's activations,
masked where a quantization point saturated.

The oracle is a hand-written backward through time over the integer reference's trace: every
operator's float function is differentiated at the dequantized codes of its inputs, and its
gradient is zeroed where its float value fell outside the operator's code range.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quant_gru import QuantGRU
from quant_gru.kernels.torch.quantized_forward import build_programs, initial_codes, input_codes
from quant_gru.quantize.scales import dequantize, per_row
from quant_gru.reference import integer_gru

from tolerance import assert_float_conformant


class Points:
    """Dequantized values and saturation masks of one program's operators."""

    def __init__(self, program, quant) -> None:
        self.program, self.quant = program, quant

    def value(self, name: str, codes: Tensor) -> Tensor:
        fmt = self.program.formats[name]
        return dequantize(codes, fmt.scale, fmt.zero_point)

    def mask(self, name: str, value: Tensor) -> Tensor:
        fmt = self.program.formats[name]
        level = torch.floor(value / fmt.scale + 0.5) + fmt.zero_point
        return ((level >= fmt.qmin) & (level <= fmt.qmax)).double()

    def weight(self, name: str, codes: Tensor, float_weight: Tensor) -> tuple[Tensor, Tensor]:
        scales = per_row(self.quant[name].scale, codes.shape[0]).view(-1, *[1] * (codes.dim() - 1))
        level = torch.floor(float_weight / scales + 0.5)
        inside = (level >= self.quant[name].qmin) & (level <= self.quant[name].qmax)
        return codes.double() * scales, inside.double()


def manual_backward(model: QuantGRU, x: Tensor, hx: Tensor, d_out: Tensor, d_hn: Tensor):
    """Gradients of sum(d_out * output) + sum(d_hn * h_n) for a 1-layer, 1-direction model."""
    weights = model._direction_weights()
    programs = build_programs(model._quantized_model(), weights)
    program, quant = programs[0], model._quantized_model().quant[0]
    x_codes, h0_codes = input_codes(x, programs), initial_codes(hx, programs, x)
    _, _, traces = integer_gru(programs, x_codes, h0_codes, None, 1, False, trace=True)
    trace, p = traces[0], Points(program, quant)
    w_ih, w_hh, b_ih, b_hh = (w.detach().double() for w in weights[0])
    W, mW = p.weight("weight.W", program.weight_W, w_ih)
    R, mR = p.weight("weight.R", program.weight_R, w_hh)
    bw, mbw = p.weight("weight.bw", program.bias_w, b_ih)
    br, mbr = p.weight("weight.br", program.bias_r, b_hh)
    H = model.hidden_size
    xq = p.value("input.x", trace["input.x"])
    wx = p.value("matmul.Wx", trace["matmul.Wx"])
    d_wx = torch.zeros_like(wx)
    dR, dbr = torch.zeros_like(R), torch.zeros_like(br)
    dh = d_hn[0].double().clone()
    for t in reversed(range(x.shape[0])):
        h_prev = (
            p.value("output.h", h0_codes[0])
            if t == 0
            else p.value("output.h", trace["output.h"][t - 1])
        )
        v = {
            name: p.value(name, trace[name][t])
            for name in trace
            if name not in ("input.x", "matmul.Wx")
        }
        dh = dh + d_out[t].double()
        r_pre, z_pre, g_pre = v["gate.r_pre"], v["gate.z_pre"], v["gate.g_pre"]
        r, z, g = v["gate.r_out"], v["gate.z_out"], v["gate.g_out"]
        rb = v["op.Rh_add_br"]
        # h = old + new
        d_sum = dh * p.mask("output.h", v["op.old_contrib"] + v["op.new_contrib"])
        d_old = d_sum * p.mask("op.old_contrib", z * h_prev)
        d_new = d_sum * p.mask("op.new_contrib", (1 - z) * g)
        dz = d_old * h_prev - d_new * g
        dh_prev = d_old * z
        dg = d_new * (1 - z)
        d_gpre = dg * p.mask("gate.g_out", torch.tanh(g_pre)) * (1 - torch.tanh(g_pre) ** 2)
        d_gpre = d_gpre * p.mask("gate.g_pre", wx[t, :, 2 * H :] + v["op.rRh"])
        d_rrh = d_gpre * p.mask("op.rRh", r * rb[:, 2 * H :])
        dr = d_rrh * rb[:, 2 * H :]
        d_rb = torch.zeros_like(rb)
        d_rb[:, 2 * H :] = d_rrh * r
        d_rpre = (
            dr
            * p.mask("gate.r_out", torch.sigmoid(r_pre))
            * torch.sigmoid(r_pre)
            * (1 - torch.sigmoid(r_pre))
        )
        d_zpre = (
            dz
            * p.mask("gate.z_out", torch.sigmoid(z_pre))
            * torch.sigmoid(z_pre)
            * (1 - torch.sigmoid(z_pre))
        )
        d_rpre = d_rpre * p.mask("gate.r_pre", wx[t, :, :H] + rb[:, :H])
        d_zpre = d_zpre * p.mask("gate.z_pre", wx[t, :, H : 2 * H] + rb[:, H : 2 * H])
        d_wx[t, :, :H], d_rb[:, :H] = d_rpre, d_rpre
        d_wx[t, :, H : 2 * H], d_rb[:, H : 2 * H] = d_zpre, d_zpre
        d_wx[t, :, 2 * H :] = d_gpre
        rh = v["matmul.Rh"]
        d_rb = d_rb * p.mask("op.Rh_add_br", rh + br)
        dbr += d_rb.sum(0)
        d_rh = d_rb * p.mask("matmul.Rh", h_prev @ R.T)
        dR += d_rh.T @ h_prev
        dh = dh_prev + d_rh @ R
    d_hx = dh * p.mask("output.h", hx[0].double())
    d_wx = d_wx * p.mask("matmul.Wx", xq @ W.T + bw)
    dW = torch.einsum("tbj,tbk->jk", d_wx, xq)
    dbw = d_wx.sum((0, 1))
    dx = (d_wx @ W) * p.mask("input.x", x.double())
    return {
        "input": dx,
        "hx": d_hx.unsqueeze(0),
        "weight_ih_l0": dW * mW,
        "weight_hh_l0": dR * mR,
        "bias_ih_l0": dbw * mbw,
        "bias_hh_l0": dbr * mbr,
    }


def test_qat_gradients_match_the_masked_float_gradients() -> None:
    torch.manual_seed(0)
    model = QuantGRU(5, 7).double()
    model.set_all_bitwidth(6, is_symmetric=False)
    model.calibrating = True
    with torch.no_grad():
        model(torch.randn(8, 4, 5, dtype=torch.float64))
    model.calibrating, model.use_quantization = False, True
    model.train()

    # Wider than the calibration data, so that some points saturate and masks matter.
    x = (torch.randn(8, 4, 5, dtype=torch.float64) * 1.8).requires_grad_()
    hx = (torch.randn(1, 4, 7, dtype=torch.float64) * 0.8).requires_grad_()
    out, h_n = model(x, hx)
    d_out, d_hn = torch.randn_like(out), torch.randn_like(h_n)
    ((out * d_out).sum() + (h_n * d_hn).sum()).backward()

    expected = manual_backward(model, x.detach(), hx.detach(), d_out, d_hn)
    actual = {"input": x.grad, "hx": hx.grad}
    actual.update({name: p.grad for name, p in model.named_parameters()})
    for name, want in expected.items():
        assert_float_conformant(actual[name], want, f"grad {name}")
    # The case must exercise the masks: some gradients of the input are cut.
    assert (expected["input"] == 0).any()
    assert (expected["input"] != 0).any()
