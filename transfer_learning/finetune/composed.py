"""The fine-tuned model's ONNX graph joined from two exports: the frozen prefix's, already exported and checked for
its rows (finetune/prefix.py), and the trained tail with the head, exported alone from the prefix's rows. The
dynamo exporter's time grows with the graph it traces, and the prefix is most of the net: exporting only the tail
costs a fraction of exporting the whole. The joined graph is checked against the whole torch net as a direct export
is (run.py), so it is deployed only when it computes what the net computes.
"""
from __future__ import annotations

import os
from pathlib import Path

import onnx
import torch
from onnx import compose
from torch import nn

from transfer_learning.backbone import onnx_export
from transfer_learning.common.atomic import atomic_write
from transfer_learning.finetune.model import FineTuneNet, tail_features
from transfer_learning.finetune.prefix import FlatPrefix

TAIL = "tail/"  # the tail's names in the joined graph, apart from the prefix's


class TailProbabilities(nn.Module):
    """The prefix's flat rows -> (class probabilities, logits), as model.Probabilities gives them from images.
    It holds the tail and the head alone: the exporter traces and lifts every parameter of the module it is given,
    and the whole net's are mostly the prefix's (measured: a tail export holding the net cost ~9 s of CPU)."""

    def __init__(self, net: FineTuneNet, shape: tuple[int, ...]):
        super().__init__()
        self.tail, self.head, self.pool = net.tail, net.head, net.pool
        self.shape = shape

    def forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(tail_features(self.tail, rows.reshape(-1, *self.shape), self.pool))
        return torch.softmax(logits, dim=1), logits


def export_joined(net: FineTuneNet, prefix_onnx: bytes, shape: tuple[int, ...], example: torch.Tensor, path: Path,
                  opset: int, outputs: tuple[str, ...]) -> None:
    """Writes to `path` the prefix's graph (`prefix_onnx`, output rows of one image's `shape` flattened) followed
    by the tail and head exported now: images in, `outputs` out, as onnx_export.export names them."""
    with torch.no_grad():
        rows = FlatPrefix(net).eval()(example)
    tail_file = path.with_name(f".{path.name}.{os.getpid()}.tail")
    try:
        onnx_export.export(TailProbabilities(net, shape), rows, tail_file, opset, outputs)
        tail = onnx.load(str(tail_file))
    finally:
        tail_file.unlink(missing_ok=True)
    tail = compose.add_prefix(tail, TAIL, rename_outputs=False)
    prefix = onnx.load_from_string(prefix_onnx)
    joined = compose.merge_models(prefix, tail, io_map=[(onnx_export.OUTPUT, TAIL + onnx_export.INPUT)])
    # merge_models lists a domain both graphs import twice (the versions agree, or it raises): once is the format
    versions = {entry.domain: entry.version for entry in joined.opset_import}
    del joined.opset_import[:]
    joined.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in versions.items())
    onnx_export.canonicalize(joined.graph)
    with atomic_write(path, "wb") as handle:
        handle.write(joined.SerializeToString())
