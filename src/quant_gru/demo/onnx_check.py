"""The demo's ONNX Runtime check: the classifier's accuracy when its GRU runs in ONNX Runtime
(float and QDQ exports) against the same classifier in PyTorch."""

from __future__ import annotations

from pathlib import Path

import torch

from quant_gru.demo.classifier import VowelClassifier, predictions
from quant_gru.demo.data import Utterances


def onnx_accuracy(model: VowelClassifier, path: Path, data: Utterances) -> float:
    """Percent correct with the GRU of ``path`` run by ONNX Runtime on the padded features,
    the head applied in PyTorch to the output at each sequence's last frame."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (outputs,) = session.run(["output"], {"input": data.features.cpu().numpy()})
    head = model.head
    with torch.no_grad():
        device = head.weight.device
        logits = model.head_on_outputs(torch.from_numpy(outputs).to(device), data.lengths)
    correct = (predictions(logits).cpu() == data.labels.cpu()).sum().item()
    return 100.0 * correct / len(data)
