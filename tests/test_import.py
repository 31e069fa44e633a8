"""Importing the package must stay cheap and side-effect free."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import torch
import quant_gru
assert quant_gru.QuantGRU is not None
loaded = sorted(m for m in sys.modules if m == "triton" or m.startswith("triton."))
assert not loaded, f"import quant_gru imported {loaded}"
assert not torch.cuda.is_initialized(), "import quant_gru initialised CUDA"
print("clean")
"""


def test_import_does_not_import_triton_or_touch_cuda() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"
