"""Export a cut backbone to one ONNX file with a dynamic batch, and check it against torch with ONNX Runtime."""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from transfer_learning.common.atomic import atomic_write

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)
INPUT, OUTPUT = "images", "features"


def export(module: nn.Module, example: torch.Tensor, path: Path, opset: int, outputs: tuple[str, ...] = (OUTPUT,)
           ) -> None:
    import onnx  # here, not at the top: ~2 CPU-s, and a process that only runs parity checks needs none

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), out_of_place(module), without_grad(module):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(), (example,), dynamo=True, opset_version=opset, input_names=[INPUT],
            output_names=list(outputs), dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
        )
    exported = path.with_name(f".{path.name}.{os.getpid()}.export")
    try:
        program.save(str(exported), external_data=False)  # one self-contained file, weights inside
        model = onnx.load(str(exported))
    finally:
        exported.unlink(missing_ok=True)
    canonicalize(model.graph)
    with atomic_write(path, "wb") as handle:
        handle.write(model.SerializeToString())


@contextlib.contextmanager
def out_of_place(module: nn.Module) -> Iterator[None]:
    """Activations such as ReLU6(inplace=True) switched to out-of-place while exporting, then back: torch.export
    decomposes each in-place op with a costly functionalization (MobileNetV2: ~12 s of CPU per export instead of ~7),
    and the ONNX file is the same bytes either way (tests/test_export.py)."""
    switched = [layer for layer in module.modules() if getattr(layer, "inplace", None) is True]
    for layer in switched:
        layer.inplace = False
    try:
        yield
    finally:
        for layer in switched:
            layer.inplace = True


@contextlib.contextmanager
def without_grad(module: nn.Module) -> Iterator[None]:
    """Parameters traced as constants of no gradient (requires_grad off, under no_grad), then switched back: the
    exporter's tracing then carries no autograd bookkeeping (MobileNetV2: ~5 % fewer Python calls, 1-3 CPU-s per
    export), and the ONNX file is the same bytes either way (tests/test_export.py)."""
    switched = [parameter for parameter in module.parameters() if parameter.requires_grad]
    for parameter in switched:
        parameter.requires_grad_(False)
    try:
        with torch.no_grad():
            yield
    finally:
        for parameter in switched:
            parameter.requires_grad_(True)


def canonicalize(graph: onnx.GraphProto) -> None:
    """Name nodes and intermediate values by position and drop per-node metadata.

    The exporter numbers them from process-wide counters and records stack traces, so the same model
    exported twice gives different bytes; the feature store keys features by these bytes."""
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {t.name for t in graph.initializer}
    renamed: dict[str, str] = {}
    for index, node in enumerate(graph.node):
        node.name = f"{node.op_type}_{index}"
        node.doc_string = ""
        del node.metadata_props[:]
        for slot, name in enumerate(node.input):
            node.input[slot] = renamed.get(name, name)
        for slot, name in enumerate(node.output):
            if name and name not in keep:
                renamed[name] = node.output[slot] = f"t{len(renamed)}"
    for value in graph.value_info:
        value.name = renamed.get(value.name, value.name)
    graph.doc_string = ""


def cpu_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # idle ONNX Runtime threads would spin between runs, burning CPU that changes no output
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def parity(module: nn.Module, path: Path, batches: list[torch.Tensor], relative: bool = False) -> float:
    """Max abs difference between torch and ONNX Runtime outputs (all of them) over batches of different sizes.

    The dynamo exporter can silently fix the batch dimension to the example's; running several batch sizes
    through the session catches that (ORT raises on a shape mismatch). `relative`: differences divided by the
    output's largest magnitude (when above 1), for outputs such as logits whose scale is not bounded."""
    session = cpu_session(path)
    worst = 0.0
    for batch in batches:
        with torch.inference_mode():
            expected = module.eval()(batch)
        expected = expected if isinstance(expected, tuple) else (expected,)
        for want, got in zip(expected, session.run(None, {INPUT: batch.numpy()}), strict=True):
            if got.shape != tuple(want.shape):
                raise RuntimeError(f"ONNX output shape {got.shape} != torch {tuple(want.shape)} at batch {len(batch)}")
            difference = float(np.abs(got - want.numpy()).max())
            worst = max(worst, difference / max(1.0, float(want.abs().max())) if relative else difference)
    return worst
