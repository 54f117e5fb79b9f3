"""The export stage's work: models/backbone + backbone.cut/pool -> models/backbone.onnx (dynamic batch) and the
metrics. `parity_batches` also checks the fine-tuned model's export.

The ONNX file is checked against torch with ONNX Runtime on real photos at two batch sizes; above
export.atol the stage fails with the numbers.
"""
import hashlib
import importlib.util
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transfer_learning.backbone import files as backbone_files
from transfer_learning.backbone import onnx_export
from transfer_learning.backbone.anatomy import PooledFeatures
from transfer_learning.common.errors import UserError
from transfer_learning.params import BackboneParams, ExportParams

log = logging.getLogger("export")
for noisy in ("onnx_ir", "onnxscript"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
PARITY_BATCH_SIZES = (2, 5)


def sample_photos() -> list[Image.Image]:
    """scikit-learn's bundled sample photos (china.jpg, flower.jpg), read as its load_sample_images reads them,
    from the installed package's folder: importing scikit-learn (and scipy) would cost seconds of CPU."""
    spec = importlib.util.find_spec("sklearn")
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "images"
    paths = sorted(folder.glob("*.jpg"))
    if not paths:
        raise UserError(f"no sample photos (*.jpg) in {folder}: reinstall scikit-learn")
    photos = []
    for path in paths:
        with Image.open(path) as image:
            photos.append(Image.fromarray(np.asarray(image)))
    return photos


def parity_batches(transform) -> list[torch.Tensor]:
    """Real photos (scikit-learn's bundled samples) and seeded crops of them, one batch per size."""
    photos = sample_photos()
    rng = np.random.default_rng(0)
    images = []
    while len(images) < max(PARITY_BATCH_SIZES):
        photo = photos[len(images) % len(photos)]
        w, h = photo.size
        left, top = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
        images.append(transform(photo.crop((left, top, left + 2 * w // 3, top + 2 * h // 3))))
    return [torch.stack(images[:n]) for n in PARITY_BATCH_SIZES]


def export_backbone(backbone_params: BackboneParams, export_params: ExportParams) -> dict:
    """models/backbone cut and pooled -> backbone_files.ONNX, checked against torch; returns metrics/export.json's
    dict (the stage writes it before `check_parity`, so a failed check leaves its numbers)."""
    started = time.perf_counter()
    backbone = backbone_files.load()
    node = backbone.anatomy.cut_node(backbone_params.cut)
    module = PooledFeatures(backbone.model(), node, backbone_params.pool).eval()
    batches = parity_batches(backbone.preprocessing.transform())
    log.info("exporting %s cut at %r (backbone.cut=%r), pool %s, opset %d", backbone.arch, node,
             backbone_params.cut, backbone_params.pool, export_params.opset)
    onnx_export.export(module, batches[0], backbone_files.ONNX, export_params.opset)
    max_abs_diff = onnx_export.parity(module, backbone_files.ONNX, batches)
    with torch.inference_mode():
        feature_dim = int(module(batches[0]).shape[1])
    data = backbone_files.ONNX.read_bytes()
    return {
        "arch": backbone.arch,
        "weights": backbone.weights or "none",
        "cut": backbone_params.cut,
        "cut_node": node,
        "pool": backbone_params.pool,
        "feature_dim": feature_dim,
        "opset": export_params.opset,
        "parity_batch_sizes": list(PARITY_BATCH_SIZES),
        "max_abs_diff": max_abs_diff,
        "atol": export_params.atol,
        "onnx_mb": round(len(data) / 1e6, 2),
        "onnx_sha256": hashlib.sha256(data).hexdigest(),
        "seconds": round(time.perf_counter() - started, 2),
    }


def check_parity(metrics: dict) -> None:
    """Fails when ONNX Runtime differs from torch by more than export.atol."""
    if metrics["max_abs_diff"] > metrics["atol"]:
        raise UserError(
            f"export.atol: ONNX Runtime differs from torch by {metrics['max_abs_diff']:.3g} > atol "
            f"{metrics['atol']:g} (batches {PARITY_BATCH_SIZES}); see metrics/export.json. Raise export.atol or "
            "try another opset."
        )
    log.info("%s: feature_dim %d, max |onnx - torch| = %.2e (atol %g)", backbone_files.ONNX, metrics["feature_dim"],
             metrics["max_abs_diff"], metrics["atol"])
