"""Quick start: QuantGRU as a drop-in nn.GRU.

Builds a 2-layer bidirectional QuantGRU, loads an nn.GRU's weights into it, and shows that both
give the same output on a batch, an unbatched sequence and a packed batch of mixed lengths.
Then calibrates it, switches on 8-bit quantization (the exact integer model) and reports how
close the quantized output stays to the float one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from quant_gru import QuantGRU


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def main() -> None:
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # cuDNN rounds float32 products to TF32 by default on recent GPUs; compare at full float32.
    torch.backends.cudnn.allow_tf32 = False
    reference = nn.GRU(64, 128, num_layers=2, bidirectional=True, batch_first=True).to(device)
    model = QuantGRU.from_float(reference)
    print(f"device: {device}\nmodel:  {model}")

    x = torch.randn(32, 50, 64, device=device)
    lengths = torch.randint(1, 51, (32,))
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    inputs = {"batched [B, T, I]": x, "unbatched [T, I]": x[0], "packed, mixed lengths": packed}

    with torch.no_grad():
        for name, data in inputs.items():
            out, h_n = model(data)
            ref_out, ref_h = reference(data)
            if name.startswith("packed"):
                out, ref_out = out.data, ref_out.data
            print(
                f"{name:24s} output {tuple(out.shape)!s:16s} h_n {tuple(h_n.shape)!s:14s} "
                f"max |diff| to nn.GRU: output {max_difference(out, ref_out):.2e}, "
                f"h_n {max_difference(h_n, ref_h):.2e}"
            )
    quantize(model, x)


def quantize(model: QuantGRU, x: torch.Tensor) -> None:
    """Calibrate on two batches, quantize every operator to 8 bits, compare with float."""
    model.set_all_bitwidth(8, is_symmetric=False)
    model.calibrating = True
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn_like(x))
        model.calibrating = False
        reference, _ = model(x)
        model.use_quantization = True
        quantized, _ = model(x)
    noise = (quantized - reference).double().square().sum()
    sqnr = 10 * torch.log10(reference.double().square().sum() / noise).item()
    cosine = torch.nn.functional.cosine_similarity(
        quantized.double().flatten(), reference.double().flatten(), dim=0
    ).item()
    print(
        f"8-bit quantized ({model.calibration_method} calibration): output SQNR {sqnr:.1f} dB, "
        f"cosine to float {cosine:.5f}"
    )


if __name__ == "__main__":
    main()
