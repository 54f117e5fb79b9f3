"""export: models/backbone + backbone.cut/pool -> models/backbone.onnx (dynamic batch) + metrics/export.json.

The ONNX file is checked against torch with ONNX Runtime on real photos at two batch sizes; above
export.atol the stage fails with the numbers.
"""
import hashlib
import logging
import time

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from stages.core import backbone_files, onnx_export
from stages.core.backbones import PooledFeatures
from stages.core.config import load_params
from stages.core.errors import UserError, run_main
from stages.core.metrics import write_metrics

log = logging.getLogger("export")
for noisy in ("onnx_ir", "onnxscript"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
PARITY_BATCH_SIZES = (2, 5)


def parity_batches(transform) -> list[torch.Tensor]:
    """Real photos (scikit-learn's bundled samples) and seeded crops of them, one batch per size."""
    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(0)
    images = []
    while len(images) < max(PARITY_BATCH_SIZES):
        photo = photos[len(images) % len(photos)]
        w, h = photo.size
        left, top = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
        images.append(transform(photo.crop((left, top, left + 2 * w // 3, top + 2 * h // 3))))
    return [torch.stack(images[:n]) for n in PARITY_BATCH_SIZES]


def main() -> None:
    started = time.perf_counter()
    params = load_params()
    backbone = backbone_files.load()
    node = backbone.anatomy.cut_node(params.backbone.cut)
    module = PooledFeatures(backbone.model(), node, params.backbone.pool).eval()
    batches = parity_batches(backbone.preprocessing.transform())
    log.info("exporting %s cut at %r (backbone.cut=%r), pool %s, opset %d", backbone.arch, node,
             params.backbone.cut, params.backbone.pool, params.export.opset)
    onnx_export.export(module, batches[0], backbone_files.ONNX, params.export.opset)
    max_abs_diff = onnx_export.parity(module, backbone_files.ONNX, batches)
    with torch.inference_mode():
        feature_dim = int(module(batches[0]).shape[1])
    data = backbone_files.ONNX.read_bytes()
    write_metrics("export", {
        "arch": backbone.arch,
        "weights": backbone.weights or "none",
        "cut": params.backbone.cut,
        "cut_node": node,
        "pool": params.backbone.pool,
        "feature_dim": feature_dim,
        "opset": params.export.opset,
        "parity_batch_sizes": list(PARITY_BATCH_SIZES),
        "max_abs_diff": max_abs_diff,
        "atol": params.export.atol,
        "onnx_mb": round(len(data) / 1e6, 2),
        "onnx_sha256": hashlib.sha256(data).hexdigest(),
        "seconds": round(time.perf_counter() - started, 2),
    })
    if max_abs_diff > params.export.atol:
        raise UserError(
            f"export.atol: ONNX Runtime differs from torch by {max_abs_diff:.3g} > atol {params.export.atol:g} "
            f"(batches {PARITY_BATCH_SIZES}); see metrics/export.json. Raise export.atol or try another opset."
        )
    log.info("%s: feature_dim %d, max |onnx - torch| = %.2e (atol %g)", backbone_files.ONNX, feature_dim,
             max_abs_diff, params.export.atol)


if __name__ == "__main__":
    run_main(main)
