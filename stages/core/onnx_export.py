"""Export a cut backbone to one ONNX file with a dynamic batch, and check it against torch with ONNX Runtime."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

log = logging.getLogger(__name__)
INPUT, OUTPUT = "images", "features"


def export(module: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(), (example,), dynamo=True, opset_version=opset, input_names=[INPUT],
            output_names=[OUTPUT], dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
        )
    tmp = path.with_suffix(".onnx.part")
    program.save(str(tmp), external_data=False)  # one self-contained file, weights inside
    tmp.replace(path)


def cpu_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def parity(module: nn.Module, path: Path, batches: list[torch.Tensor]) -> float:
    """Max abs difference between torch and ONNX Runtime outputs over batches of different sizes.

    The dynamo exporter can silently fix the batch dimension to the example's; running several batch sizes
    through the session catches that (ORT raises on a shape mismatch)."""
    session = cpu_session(path)
    worst = 0.0
    for batch in batches:
        with torch.inference_mode():
            expected = module.eval()(batch).numpy()
        got = session.run([OUTPUT], {INPUT: batch.numpy()})[0]
        if got.shape != expected.shape:
            raise RuntimeError(f"ONNX output shape {got.shape} != torch {expected.shape} at batch {len(batch)}")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst
