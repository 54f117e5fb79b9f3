"""The sweep's ONNX graphs: one with a pooled output per chosen block (run once over the images), and the
ordinary `backbone.cut: N` export of one block (what a later pipeline run with that cut computes), both kept in
models/layers/ between sweeps."""
from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from transfer_learning.backbone import onnx_export
from transfer_learning.backbone.anatomy import PooledFeatures, pool_features
from transfer_learning.backbone.export import parity_batches
from transfer_learning.backbone.files import Backbone
from transfer_learning.backbone.onnx_export import INPUT
from transfer_learning.features.runtime import FeatureRunner
from transfer_learning.layers.blocks import SweepBlock
from transfer_learning.layers.kept import kept_export

log = logging.getLogger(__name__)
for noisy in ("onnx_ir", "onnxscript"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
LAYERS_DIR = Path("models/layers")
BLOCKS_ONNX = LAYERS_DIR / "blocks.onnx"
GRAPH_VERSION = 1  # bump when PooledBlocks changes


class PooledBlocks(nn.Module):
    """The backbone up to its deepest chosen block, with every chosen block's output pooled as PooledFeatures
    pools one cut (same node, same pooling): one output per block, in block order."""

    def __init__(self, model: nn.Module, blocks: list[SweepBlock], pool: str):
        super().__init__()
        PooledFeatures(model, blocks[0].node, pool)  # the same check of `pool` as an ordinary export
        self.body = create_feature_extractor(model.eval(), return_nodes={b.node: b.output for b in blocks})
        self.outputs = [b.output for b in blocks]
        self.pool = pool

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        found = self.body(x)
        return tuple(pool_features(found[name], self.pool) for name in self.outputs)


def versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in ("torch", "torchvision", "onnx", "onnxscript")}


def recipe(backbone: Backbone, nodes: list[str], pool: str, opset: int, what: str) -> dict:
    return {"what": what, "arch": backbone.arch, "weights_pt_sha256": backbone.weights_sha256, "nodes": nodes,
            "pool": pool, "opset": opset, "versions": versions()}


def blocks_onnx(backbone: Backbone, blocks: list[SweepBlock], pool: str, opset: int) -> bytes:
    def export(path: Path) -> None:
        module = PooledBlocks(backbone.model(), blocks, pool)
        onnx_export.export(module, parity_batches(backbone.preprocessing.transform())[0], path, opset,
                           outputs=tuple(module.outputs))

    return kept_export(BLOCKS_ONNX, recipe(backbone, [b.node for b in blocks], pool, opset,
                                           f"sweep graph v{GRAPH_VERSION}"), export)


def cut_onnx(backbone: Backbone, block: SweepBlock, pool: str, opset: int) -> bytes:
    """The bytes the export stage writes for `backbone.cut: block.number` (the same module, example batch and
    exporter call as transfer_learning/backbone/export.py), so that their fingerprint is that run's."""
    def export(path: Path) -> None:
        module = PooledFeatures(backbone.model(), block.node, pool).eval()
        onnx_export.export(module, parity_batches(backbone.preprocessing.transform())[0], path, opset)

    return kept_export(LAYERS_DIR / f"cut-{block.number:03d}.onnx",
                       recipe(backbone, [block.node], pool, opset, "backbone.cut export"), export)


class BlocksRunner(FeatureRunner):
    """FeatureRunner (providers, GPU padding) returning every output of the sweep graph, not only the first."""

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        n = len(batch)
        if self.pad_to and n < self.pad_to:
            batch = np.concatenate([batch, np.zeros((self.pad_to - n, *batch.shape[1:]), batch.dtype)])
        return [out[:n] for out in self.session.run(self.outputs, {INPUT: batch})]

    def dims(self, crop: int) -> list[int]:
        found = [o.shape[1] for o in self.session.get_outputs()]
        if all(isinstance(d, int) for d in found):
            return found
        return [int(out.shape[1]) for out in self(np.zeros((1, 3, crop, crop), np.float32))]
