"""The train_heads stage's work: data/features/{train,val}.h5 -> models/heads/<name>/, the head's record in
metrics/heads/<name>.json (heads/records.py), its training time in reports/timings/heads/<name>.json and the torch
heads' training curves in plots/heads/<name>/.

dvc.yaml runs one train_heads stage per head (`foreach: ${heads}`, each declaring only `heads.<name>`), so an edit
to one head retrains that head alone. Every head chooses its hyperparameters on val (heads/selection.py) and is
saved by heads/files.py. Train rows include the augmented views when extract.augment_views > 0.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from transfer_learning.common import curves
from transfer_learning.common.errors import UserError
from transfer_learning.common.metrics import TIMINGS, write_timings
from transfer_learning.features.split_files import read_split
from transfer_learning.heads import files as head_files
from transfer_learning.heads.files import FittedHead
from transfer_learning.heads.records import RECORDS_DIR, write_record
from transfer_learning.heads.selection import check_fits_the_data, estimator_and_grid, fit_head
from transfer_learning.params import HeadSpec, SklearnHead

log = logging.getLogger("train_heads")
CURVES_DIR = Path("plots/heads")
CURVES = ("train_loss", "val_loss")
FIT_WORKERS = 4  # a logistic fit casts the float32 train features to float64 per step: each worker holds such a copy


def write_curves(fitted: FittedHead, folder: Path) -> None:
    """`folder` (dvclive's layout): plots/metrics/train_loss.tsv and val_loss.tsv per epoch (step = epoch) of a head
    trained by epochs (linear, mlp: the chosen grid point); for a head fitted without epochs, no curve, only the
    note saying so (common/curves.py)."""
    curves.write_curves(folder, ((r["epoch"], curve, r[curve]) for r in getattr(fitted.estimator, "history_", [])
                                 for curve in CURVES),
                        nothing_to_plot=f"heads.{fitted.name} is a {fitted.spec.type} head, fitted without epochs: "
                                        "it has no per-epoch curve.")


def check_saveable(name: str, spec: SklearnHead, estimator) -> None:
    """Before any training: an estimator skl2onnx has no converter for needs allow_pickle (a converter that exists
    but fails on the fitted estimator is reported when it is saved, still before the old heads are replaced)."""
    from transfer_learning.heads.sklearn_onnx import has_converter  # here: only sklearn heads need onnx

    if has_converter(estimator):
        return
    if spec.allow_pickle:
        log.warning("head %s: skl2onnx has no converter for %s; saving it as a pickle (heads.%s.allow_pickle: true)",
                    name, type(estimator).__name__, name)
        return
    raise UserError(f"heads.{name}.estimator: skl2onnx has no converter for {type(estimator).__name__}, so this "
                    f"head cannot be saved as ONNX; choose an estimator skl2onnx supports, or set "
                    f"heads.{name}.allow_pickle: true to save it as a pickle (load it only from a source you trust)")


def record_of(fitted: FittedHead) -> dict:
    """metrics/heads/<name>.json: what the head chose on val (its training time goes to its timings file)."""
    return {
        "type": fitted.spec.type,
        "val_accuracy": round(fitted.val_accuracy, 6),
        "params": fitted.chosen,
        "train_rows": fitted.train_rows,
        **fitted.details,
    }


def train_heads(heads: dict[str, HeadSpec], only: list[str] | None = None) -> dict[str, dict]:
    """The heads of params.yaml `heads` that `only` names (all of them by default) trained, selected on val and
    saved; returns {name: record}. Every spec is checked and every head trained and converted before any old file
    is replaced. Training all heads also removes the files of heads no longer in params."""
    started = time.perf_counter()
    unknown = [name for name in only or [] if name not in heads]
    if unknown:
        raise UserError(f"no head {', '.join(map(repr, unknown))} under `heads` in params.yaml; "
                        f"heads: {', '.join(heads)}")
    chosen = {name: heads[name] for name in only} if only else heads
    for name, spec in chosen.items():  # every spec checked before any training
        estimator, _ = estimator_and_grid(name, spec)
        if spec.type == "sklearn":
            check_saveable(name, spec, estimator)
    train, val = read_split("train"), read_split("val").plain()
    if train.fingerprint != val.fingerprint:
        raise UserError("data/features/train.h5 and val.h5 come from different extract runs: run `dvc repro extract`")
    for name, spec in chosen.items():  # and every grid against the data, before the first fit
        check_fits_the_data(name, spec, *estimator_and_grid(name, spec), len(train))
    augmented = int((train.views > 0).sum())
    log.info("training %d head(s) on %d train rows (%d of them augmented views), selecting on %d val rows",
             len(chosen), len(train), augmented, len(val))

    # a scikit-learn head's grid points are fitted side by side, one per core up to FIT_WORKERS (heads/selection.py)
    workers = min(os.cpu_count() or 1, FIT_WORKERS)
    fitted_heads = [fit_head(name, spec, train, val, workers=workers) for name, spec in chosen.items()]
    forms = [head_files.saved_form(fitted, train.classes, train.fingerprint) for fitted in fitted_heads]
    # every head is trained and converted: only now are the old files replaced
    if not only:
        for folder in (head_files.HEADS_DIR, CURVES_DIR, RECORDS_DIR, TIMINGS / "heads"):
            shutil.rmtree(folder, ignore_errors=True)
    records = {}
    for fitted, form in zip(fitted_heads, forms):
        name = fitted.name
        shutil.rmtree(head_files.HEADS_DIR / name, ignore_errors=True)
        folder = head_files.write(form)
        write_curves(fitted, CURVES_DIR / name)
        records[name] = record_of(fitted)
        write_record(name, records[name])
        write_timings(f"heads/{name}", {"train_seconds": round(fitted.seconds, 2)})
        log.info("head %s (%s): val accuracy %.4f with %s in %.1f s -> %s (%s)", name, fitted.spec.type,
                 fitted.val_accuracy, fitted.chosen or "its params", fitted.seconds, folder, form.meta["format"])
    log.info("%d head(s) trained in %.1f s", len(records), time.perf_counter() - started)
    return records
