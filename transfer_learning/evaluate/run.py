"""The evaluate stage's work: every trained model on the test split -> plots/confusion/<model>.csv,
reports/confusion/<model>.png, reports/summary.md and metrics/evaluate.json (the test metrics; each model's val
accuracy stays in its own record, metrics/heads/<name>.json or metrics/finetune.json, and the summary shows both).

The best model is the best on val, the split every head chose its hyperparameters on (and fine-tuning its
epoch); test accuracy is reported beside it and chooses nothing. Everything is loaded and scored before any
old output is replaced, so a model that fails to load leaves the previous plots and reports in place.
"""
from __future__ import annotations

import logging
import shutil

import numpy as np

from transfer_learning.common.errors import UserError
from transfer_learning.common.metrics import read_timings
from transfer_learning.data.manifest import SPLITS
from transfer_learning.evaluate.report import (
    BEST_KEY,
    CONFUSION_PLOTS,
    Evaluated,
    ranked_by_val,
    write_confusion_csv,
    write_confusion_pngs,
    write_summary,
)
from transfer_learning.evaluate.scoring import score
from transfer_learning.features.split_files import read_labels, read_plain_keys, read_split
from transfer_learning.finetune import files as finetune_files
from transfer_learning.heads import files as head_files

log = logging.getLogger("evaluate")


def chosen_models(requested: list[str] | str, trained: list[str]) -> list[str]:
    if requested == "all":
        return trained
    unknown = [name for name in requested if name not in trained]
    if unknown:
        raise UserError(f"evaluate.models: {', '.join(map(repr, unknown))} not trained; "
                        f"trained: {', '.join(trained) or 'none'}, or all")
    return list(requested)


def evaluate_finetuned(test, keys: list[str]) -> tuple[Evaluated, np.ndarray]:
    """The fine-tuned model's row of the report, and its predicted class per test image."""
    meta = finetune_files.read_meta()
    if meta["classes"] != test.classes:
        raise UserError("models/finetune was trained on other classes than data/features/test.h5: run `dvc repro`")
    scores = finetune_files.read_test_scores(keys)
    metrics = score(test.labels, scores, probabilistic=True)
    name = finetune_files.MODEL_NAME
    seconds = read_timings("finetune").get("seconds")
    start = f"LP-FT from {meta['init_head']}" if meta["init_head"] else "fresh head"
    kind = f"fine-tuned (unfreeze {meta['unfreeze']}, {start}{', random init' if not meta['weights'] else ''})"
    log.info("%s: test accuracy %.4f", name, metrics["accuracy"])
    return (Evaluated(name, kind, metrics, meta["val_accuracy"], f"best_epoch={meta['best_epoch']}", seconds),
            scores.argmax(axis=1))


def evaluate_head(name: str, test) -> tuple[Evaluated, np.ndarray]:
    """A head's row of the report, and its predicted class per test image."""
    head = head_files.load(name)
    if head.meta["features_fingerprint"] != test.fingerprint:
        raise UserError(f"head {name!r} was trained on other features than data/features/test.h5: "
                        "run `dvc repro train_heads`")
    scores = head.scores(test.features)
    metrics = score(test.labels, scores, head.probabilistic)
    chosen = ", ".join(f"{k}={v}" for k, v in {**head.meta["chosen"], **head.meta["details"]}.items()) or "–"
    log.info("%s: test accuracy %.4f", name, metrics["accuracy"])
    return (Evaluated(name, f"{head.meta['type']} head", metrics, head.meta["val_accuracy"], chosen,
                      read_timings(f"heads/{name}").get("train_seconds")), scores.argmax(axis=1))


def evaluate(models: list[str] | str, heads: list[str]) -> dict:
    """Every model `models` names (evaluate.models; `all`: the `heads` of params.yaml, alphabetically, and the
    fine-tuned model if there is one) on the test split -> the confusion plots and images and reports/summary.md;
    returns metrics/evaluate.json's dict. The heads come from params.yaml, not from the folders
    in models/heads: a head removed from params leaves its stage's old folder behind, which is not evaluated."""
    test = read_split("test").plain()
    if len(test) == 0:
        raise UserError("the test split is empty: set data.test_fraction above 0 to evaluate")
    classes = test.classes
    fine_tuned = [finetune_files.MODEL_NAME] if finetune_files.trained() else []
    names = chosen_models(models, sorted(heads) + fine_tuned)
    if not names:
        raise UserError("no trained model to evaluate: add a head under `heads` in params.yaml")

    evaluated = [evaluate_finetuned(test, read_plain_keys("test")) if name == finetune_files.MODEL_NAME
                 else evaluate_head(name, test) for name in names]
    labels_views = {split: read_labels(split) for split in SPLITS}
    counts = {split: np.bincount(labels[views == 0], minlength=len(classes))
              for split, (labels, views) in labels_views.items()}
    results = [result for result, _ in evaluated]
    best = ranked_by_val(results)[0]

    # everything is computed: only now are the old outputs replaced
    shutil.rmtree(CONFUSION_PLOTS, ignore_errors=True)  # a model no longer evaluated leaves no stale file
    for result, predicted in evaluated:
        write_confusion_csv(result.name, test.labels, predicted, classes)
    drawn = write_confusion_pngs({result.name: predicted for result, predicted in evaluated}, test.labels, classes)
    log.info("confusion images: %d drawn (%s), %d unchanged and kept", len(drawn), ", ".join(drawn) or "none",
             len(evaluated) - len(drawn))
    write_summary(results, classes, counts, int(labels_views["train"][1].max(initial=0)))
    log.info("best on val: %s (val accuracy %.4f, test accuracy %.4f); side by side in reports/summary.md",
             best.name, best.val_accuracy if best.val_accuracy is not None else float("nan"),
             best.metrics["accuracy"])
    return {**{r.name: r.metrics for r in results}, BEST_KEY: best.name}
