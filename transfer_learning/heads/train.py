"""The train_heads stage's work: data/features/{train,val}.h5 -> models/heads/<name>/ and the metrics.

Every head in params.yaml `heads` chooses its hyperparameters on val (heads/selection.py) and is saved by
heads/files.py. Train rows include the augmented views when extract.augment_views > 0.
"""
from __future__ import annotations

import logging
import shutil
import time

from transfer_learning.common.errors import UserError
from transfer_learning.features.split_files import read_split
from transfer_learning.heads import files as head_files
from transfer_learning.heads.selection import estimator_and_grid, fit_head
from transfer_learning.params import HeadSpec

log = logging.getLogger("train_heads")


def train_heads(heads: dict[str, HeadSpec]) -> dict:
    """Every head of params.yaml `heads` trained, selected on val and saved; returns metrics/heads.json's dict."""
    started = time.perf_counter()
    for name, spec in heads.items():  # every spec checked before any training
        estimator_and_grid(name, spec)
    train, val = read_split("train"), read_split("val").plain()
    if train.fingerprint != val.fingerprint:
        raise UserError("data/features/train.h5 and val.h5 come from different extract runs: run `dvc repro extract`")
    augmented = int((train.views > 0).sum())
    log.info("training %d head(s) on %d train rows (%d of them augmented views), selecting on %d val rows",
             len(heads), len(train), augmented, len(val))

    fitted_heads = [fit_head(name, spec, train, val) for name, spec in heads.items()]
    # every head is trained: only now are the old ones replaced (a head removed from params leaves no stale files)
    shutil.rmtree(head_files.HEADS_DIR, ignore_errors=True)
    metrics = {}
    for fitted in fitted_heads:
        name, spec = fitted.name, fitted.spec
        folder = head_files.save(fitted, train.classes, train.fingerprint)
        metrics[name] = {
            "type": spec.type,
            "val_accuracy": round(fitted.val_accuracy, 6),
            "params": fitted.chosen,
            "train_seconds": round(fitted.seconds, 2),
            "train_rows": fitted.train_rows,
            **fitted.details,
        }
        log.info("head %s (%s): val accuracy %.4f with %s in %.1f s -> %s", name, spec.type, fitted.val_accuracy,
                 fitted.chosen or "its params", fitted.seconds, folder)
    log.info("%d head(s) trained in %.1f s", len(metrics), time.perf_counter() - started)
    return metrics
