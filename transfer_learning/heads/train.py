"""The train_heads stage's work: data/features/{train,val}.h5 -> models/heads/<name>/, the torch heads' training
curves in plots/heads/ and the metrics.

Every head in params.yaml `heads` chooses its hyperparameters on val (heads/selection.py) and is saved by
heads/files.py. Train rows include the augmented views when extract.augment_views > 0.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from transfer_learning.common import curves
from transfer_learning.common.errors import UserError
from transfer_learning.features.split_files import read_split
from transfer_learning.heads import files as head_files
from transfer_learning.heads.files import FittedHead
from transfer_learning.heads.selection import estimator_and_grid, fit_head
from transfer_learning.heads.sklearn_onnx import has_converter
from transfer_learning.params import HeadSpec, SklearnHead

log = logging.getLogger("train_heads")
CURVES_DIR = Path("plots/heads")
CURVES = ("train_loss", "val_loss")


def write_curves(fitted_heads: list[FittedHead]) -> None:
    """plots/heads/ (dvclive): <head>/train_loss and <head>/val_loss per epoch (step = epoch) for every head trained
    by epochs (linear, mlp: the chosen grid point); with no such head, train_loss and val_loss with no rows."""
    curves.write_curves(CURVES_DIR, ((r["epoch"], f"{fitted.name}/{curve}", r[curve])
                                     for fitted in fitted_heads for r in getattr(fitted.estimator, "history_", [])
                                     for curve in CURVES), empty=CURVES)


def check_saveable(name: str, spec: SklearnHead, estimator) -> None:
    """Before any training: an estimator skl2onnx has no converter for needs allow_pickle (a converter that exists
    but fails on the fitted estimator is reported when it is saved, still before the old heads are replaced)."""
    if has_converter(estimator):
        return
    if spec.allow_pickle:
        log.warning("head %s: skl2onnx has no converter for %s; saving it as a pickle (heads.%s.allow_pickle: true)",
                    name, type(estimator).__name__, name)
        return
    raise UserError(f"heads.{name}.estimator: skl2onnx has no converter for {type(estimator).__name__}, so this "
                    f"head cannot be saved as ONNX; choose an estimator skl2onnx supports, or set "
                    f"heads.{name}.allow_pickle: true to save it as a pickle (load it only from a source you trust)")


def train_heads(heads: dict[str, HeadSpec]) -> dict:
    """Every head of params.yaml `heads` trained, selected on val and saved; returns metrics/heads.json's dict."""
    started = time.perf_counter()
    for name, spec in heads.items():  # every spec checked before any training
        estimator, _ = estimator_and_grid(name, spec)
        if spec.type == "sklearn":
            check_saveable(name, spec, estimator)
    train, val = read_split("train"), read_split("val").plain()
    if train.fingerprint != val.fingerprint:
        raise UserError("data/features/train.h5 and val.h5 come from different extract runs: run `dvc repro extract`")
    augmented = int((train.views > 0).sum())
    log.info("training %d head(s) on %d train rows (%d of them augmented views), selecting on %d val rows",
             len(heads), len(train), augmented, len(val))

    fitted_heads = [fit_head(name, spec, train, val) for name, spec in heads.items()]
    forms = [head_files.saved_form(fitted, train.classes, train.fingerprint) for fitted in fitted_heads]
    # every head is trained and converted: only now are the old ones replaced (a head removed from params leaves
    # no stale files)
    shutil.rmtree(head_files.HEADS_DIR, ignore_errors=True)
    metrics = {}
    for fitted, form in zip(fitted_heads, forms):
        name, spec = fitted.name, fitted.spec
        folder = head_files.write(form)
        metrics[name] = {
            "type": spec.type,
            "val_accuracy": round(fitted.val_accuracy, 6),
            "params": fitted.chosen,
            "train_seconds": round(fitted.seconds, 2),
            "train_rows": fitted.train_rows,
            **fitted.details,
        }
        log.info("head %s (%s): val accuracy %.4f with %s in %.1f s -> %s (%s)", name, spec.type,
                 fitted.val_accuracy, fitted.chosen or "its params", fitted.seconds, folder, form.meta["format"])
    write_curves(fitted_heads)
    log.info("%d head(s) trained in %.1f s", len(metrics), time.perf_counter() - started)
    return metrics
