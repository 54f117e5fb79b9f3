"""The fine-tune's frozen prefix run as extract runs the backbone: exported to ONNX, checked against torch within
export.atol, and run in ONNX Runtime (the provider chosen from extract.providers) over the images the feature
store lacks. Its rows live in the store under the fingerprint extract's rows follow (features/fingerprint.py): the
sha256 of the ONNX bytes run (weights, prefix node) and the preprocessing.

The export is kept in the store (`finetune/<recipe digest>/prefix.onnx`, with the recipe and sha256 beside it), as
the layer sweep keeps its graphs: exporting takes seconds, a run whose rows are all stored should not pay it. Every
run checks the kept file against the torch prefix before its bytes name or compute a row: a file swapped together
with its record passes the digest, not that check, and is exported again. In a data-parallel run the launcher
checks it once (`Checked`); each rank then only compares the bytes it reads with the digest of the bytes the launcher
checked, and checks them against torch itself when they differ.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from torch import nn

from transfer_learning.backbone import onnx_export
from transfer_learning.backbone.export import parity_batches
from transfer_learning.backbone.files import Backbone
from transfer_learning.common.errors import UserError
from transfer_learning.common.hashing import sha256_bytes
from transfer_learning.data.images import Preprocessing
from transfer_learning.features.extract import compute
from transfer_learning.features.fingerprint import about, digest, fingerprint_spec
from transfer_learning.features.runtime import FeatureRunner
from transfer_learning.features.store import FeatureStore
from transfer_learning.finetune.data import LabelledImages
from transfer_learning.finetune.model import FineTuneNet
from transfer_learning.layers.graph import versions
from transfer_learning.layers.kept import kept_export, record_of
from transfer_learning.params import ExportParams

log = logging.getLogger(__name__)
KEPT_DIR = "finetune"  # under extract.store, beside the runs' checkpoints
BATCH = 64


class FlatPrefix(nn.Module):
    """The net's frozen prefix, its output flattened to one row per image: what is exported and stored."""

    def __init__(self, net: FineTuneNet):
        super().__init__()
        self.prefix = net.prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.prefix(x)
        return (out["out"] if isinstance(out, dict) else out).flatten(1)


def prefix_spec(onnx_sha256: str, preprocessing: Preprocessing) -> dict:
    """What the prefix's rows depend on, by extract's rule for the ONNX bytes it runs (fp32 rows)."""
    return fingerprint_spec(onnx_sha256, preprocessing, "float32")


def prefix_fingerprint(onnx_sha256: str, preprocessing: Preprocessing) -> str:
    """The store folder of the prefix's rows."""
    return digest(prefix_spec(onnx_sha256, preprocessing))


def recipe(backbone: Backbone, net: FineTuneNet, cut_node: str, opset: int) -> dict:
    """What the kept export was made from: the cut node too, since the prefix is built differently when it is the
    whole cut (unfreeze 0) than when a tail follows it."""
    return {"what": "finetune frozen prefix", "arch": backbone.arch, "weights_pt_sha256": backbone.weights_sha256,
            "prefix_node": net.split.prefix_node, "cut_node": cut_node, "opset": opset, "versions": versions()}


def kept_path(store: Path, made_from: dict) -> Path:
    digest = hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()
    return store / KEPT_DIR / digest / "prefix.onnx"


@dataclass(frozen=True)
class Checked:
    """Prefix bytes another process of this run (the launcher) checked against torch: their sha256 and how far
    they were from torch."""

    sha256: str
    max_abs_diff: float

    def to_json(self) -> str:
        return json.dumps({"sha256": self.sha256, "max_abs_diff": self.max_abs_diff}) + "\n"

    @classmethod
    def read(cls, path: Path) -> "Checked":
        record = json.loads(path.read_text())
        return cls(str(record["sha256"]), float(record["max_abs_diff"]))


def checked_export(module: FlatPrefix, made_from: dict, path: Path, preprocessing: Preprocessing,
                   atol: float, checked: Checked | None = None) -> tuple[bytes, float]:
    """The prefix's ONNX bytes (kept, or exported now) and their largest difference from torch on real photos,
    relative to the output's scale; a UserError naming export.atol when even a fresh export is further off.
    `checked`: what the launcher found for the bytes it checked; the same bytes are not checked again."""
    exported = []

    @functools.cache
    def batches() -> list[torch.Tensor]:  # real photos, read only when something is exported or checked
        return parity_batches(preprocessing.transform())

    def export(target: Path) -> None:
        onnx_export.export(module, batches()[0], target, made_from["opset"])
        exported.append(target)

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # one exporter; the torchrun ranks wait, then reuse it
        data = kept_export(path, made_from, export)
        if checked is not None and not exported and sha256_bytes(data) == checked.sha256:
            log.info("the frozen prefix's export %s: the bytes the launcher checked against torch (sha256 compared)",
                     path)
            path.touch()
            return data, checked.max_abs_diff
        if checked is not None:
            log.warning("the frozen prefix's export %s is not the file the launcher checked: checking it here", path)
        max_abs_diff = onnx_export.parity(module, path, batches(), relative=True)
        if max_abs_diff > atol and not exported:
            log.warning("the kept frozen-prefix export %s differs from torch by %.3g > export.atol %g: exporting "
                        "again", path, max_abs_diff, atol)
            record_of(path).unlink(missing_ok=True)
            data = kept_export(path, made_from, export)
            max_abs_diff = onnx_export.parity(module, path, batches(), relative=True)
        path.touch()  # its last use, which `stages.store gc` keeps a recent one by
    if max_abs_diff > atol:
        raise UserError(f"export.atol: the frozen prefix's ONNX ({made_from['prefix_node']}) differs from torch by "
                        f"{max_abs_diff:.3g} > {atol:g} (relative to the output's scale); raise export.atol or try "
                        "another export.opset")
    return data, max_abs_diff


@dataclass(frozen=True)
class FrozenPrefix:
    """The exported prefix and where its rows are kept."""

    onnx: bytes
    fingerprint: str
    described: dict  # what the fingerprint stands for, kept beside the rows for `python -m stages.store list`
    shape: tuple[int, ...]  # one image's output
    max_abs_diff: float  # ONNX Runtime vs torch, relative to the output's scale
    store: Path
    preprocessing: Preprocessing
    providers: list[str]

    def rows(self, images: LabelledImages, workers: int) -> torch.Tensor:
        """The prefix's output for every image (plain view), N × shape: the store's rows, the missing ones computed
        first in ONNX Runtime, as extract computes features."""
        keys = images.keys()
        dim = int(np.prod(self.shape))
        with FeatureStore(self.store, self.fingerprint, dim, about=self.described) as store:
            todo = {key: request for key, request in zip(keys, images.requests) if key not in store}
            log.info("frozen prefix outputs %s: %d reused from %s, %d to compute", self.shape,
                     len(keys) - len(todo), store.dir, len(todo))
            if todo:
                runner = FeatureRunner(self.onnx, self.providers, BATCH)
                seconds = compute(store, todo, runner, self.preprocessing, BATCH, workers)
                log.info("frozen prefix: %d images in %.1f s (%.1f img/s) on %s", len(todo), seconds,
                         len(todo) / max(seconds, 1e-9), runner.provider)
            store.commit()
            store.compact()
            rows = np.concatenate(list(store.gather(keys))) if keys else np.zeros((0, dim), np.float32)
        return torch.from_numpy(rows).reshape(len(keys), *self.shape)


def frozen_prefix(net: FineTuneNet, backbone: Backbone, cut_node: str, preprocessing: Preprocessing,
                  export: ExportParams, providers: list[str], store: Path,
                  checked: Checked | None = None) -> FrozenPrefix:
    """The net's frozen prefix exported (or its kept export reused) and checked against torch (unless these are the
    bytes `checked` names)."""
    module = FlatPrefix(net).eval()
    made_from = recipe(backbone, net, cut_node, export.opset)
    path = kept_path(store, made_from)
    data, max_abs_diff = checked_export(module, made_from, path, preprocessing, export.atol, checked)
    shape = tuple(net.prefix_output(torch.zeros(1, 3, preprocessing.crop, preprocessing.crop)).shape[1:])
    log.info("frozen prefix (%s) as ONNX: %s, max |onnx - torch| %.2g (relative, export.atol %g)",
             made_from["prefix_node"], path, max_abs_diff, export.atol)
    spec = prefix_spec(sha256_bytes(data), preprocessing)
    described = about(spec, f"fine-tune frozen prefix, up to node {made_from['prefix_node']}", arch=backbone.arch,
                      weights=backbone.weights, feature_dim=int(np.prod(shape)))
    return FrozenPrefix(data, digest(spec), described, shape, max_abs_diff, store, preprocessing, list(providers))
