"""What evaluate writes besides its metrics: confusion matrices for `dvc plots show` and as PNG, and
reports/summary.md with every model side by side, ranked by val accuracy."""
from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfer_learning.common.atomic import atomic_write_text
from transfer_learning.common.hashing import sha256_file
from transfer_learning.evaluate.choice import BEST_KEY, best_first

log = logging.getLogger("evaluate")

CONFUSION_PLOTS = Path("plots/confusion")
CONFUSION_IMAGES = Path("reports/confusion")
SUMMARY = Path("reports/summary.md")
# per PNG: the sha256 of what it shows (model name, classes, test labels, predictions) and of its bytes
IMAGES_INDEX = CONFUSION_IMAGES / "index.json"
PNG_STYLE = 2  # part of what a PNG shows: a change to the drawing (confusion_image.py) bumps it
COLUMNS = [("accuracy", "test accuracy"), ("balanced_accuracy", "balanced acc."), ("macro_f1", "macro F1"),
           ("top5_accuracy", "top-5"), ("log_loss", "log loss")]


@dataclass(frozen=True)
class Evaluated:
    name: str
    kind: str  # what the model is, e.g. "logistic head" or "fine-tuned"
    metrics: dict[str, float]
    val_accuracy: float | None
    chosen: str  # its selected hyperparameters, as text
    train_seconds: float | None


def ranked_by_val(results: list[Evaluated]) -> list[Evaluated]:
    """Best val accuracy first, the chosen model's rule (evaluate/choice.py)."""
    return best_first(results, lambda r: r.val_accuracy)


def write_confusion_csv(name: str, labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> Path:
    """One row per test image, `actual,predicted` class names: the layout of DVC's confusion template."""
    CONFUSION_PLOTS.mkdir(parents=True, exist_ok=True)
    path = CONFUSION_PLOTS / f"{name}.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        writer.writerows((classes[a], classes[p]) for a, p in zip(labels, predicted))
    return path


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """counts[actual, predicted]."""
    return np.bincount(labels * n_classes + predicted, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def write_confusion_png(name: str, labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> Path:
    """reports/confusion/<model>.png: counts in the cells, true label down, predicted label across
    (evaluate/confusion_image.py)."""
    from transfer_learning.evaluate.confusion_image import draw_confusion

    counts = confusion_matrix(np.asarray(labels), np.asarray(predicted), len(classes))
    return draw_confusion(CONFUSION_IMAGES / f"{name}.png", counts, classes, name)


def _shown(name: str, labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> str:
    digest = hashlib.sha256(json.dumps([PNG_STYLE, name, classes]).encode())
    for array in (labels, predicted):
        digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    return digest.hexdigest()


def write_confusion_pngs(predictions: dict[str, np.ndarray], labels: np.ndarray, classes: list[str]) -> list[str]:
    """reports/confusion/<model>.png for every model in `predictions` (name -> predicted class per test image);
    returns the names drawn. A PNG that shows what it would show now, and whose bytes match the sha256 recorded
    when it was drawn, is kept (a one-head edit changes one model); a damaged one is drawn again. Files of other
    models are removed."""
    try:
        index = json.loads(IMAGES_INDEX.read_text())
    except (OSError, ValueError):
        index = {}
    kept, drawn = {}, []
    for name, predicted in predictions.items():
        shown, path, entry = _shown(name, labels, predicted, classes), CONFUSION_IMAGES / f"{name}.png", index.get(name)
        if isinstance(entry, dict) and entry.get("shown") == shown and path.is_file():
            if sha256_file(path) == entry.get("sha256"):
                kept[name] = entry
                continue
            log.warning("%s does not match the sha256 recorded when it was drawn: drawing it again", path)
        write_confusion_png(name, labels, predicted, classes)
        kept[name] = {"shown": shown, "sha256": sha256_file(path)}
        drawn.append(name)
    wanted = {f"{name}.png" for name in predictions} | {IMAGES_INDEX.name}
    for path in CONFUSION_IMAGES.glob("*"):
        if path.name not in wanted:
            path.unlink()
    atomic_write_text(IMAGES_INDEX, json.dumps(kept, indent=2, sort_keys=True) + "\n")
    return drawn


def _number(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def write_summary(results: list[Evaluated], classes: list[str], split_counts: dict[str, np.ndarray],
                  augmented_views: int) -> Path:
    """A table of every model ranked by val accuracy, the best marked ★, test metrics beside it; then the images
    per class and split."""
    ranked = ranked_by_val(results)
    columns = [(key, title) for key, title in COLUMNS if any(key in r.metrics for r in results)]
    lines = ["# Models side by side (ranked by val accuracy, test split beside it)", ""]
    lines.append("| model | kind | val accuracy | " + " | ".join(t for _, t in columns) + " | chosen | train s |")
    lines.append("|---|---|---:|" + "---:|" * len(columns) + "---|---:|")
    for r in ranked:
        mark = " ★" if r is ranked[0] else ""
        cells = [_number(r.metrics.get(key)) for key, _ in columns]
        lines.append(f"| {r.name}{mark} | {r.kind} | {_number(r.val_accuracy)} | " + " | ".join(cells)
                     + f" | {r.chosen} | {_number(r.train_seconds, 1)} |")
    lines += ["", f"★ best val accuracy (`{BEST_KEY}` in metrics/evaluate.json; ties: the first in evaluate.models, "
              "for `all` the heads alphabetically, then finetune). Every head chose its hyperparameters on val, and "
              "fine-tuning its best epoch; the test columns are measured once and choose nothing. Confusion "
              "matrices: `reports/confusion/<model>.png`, `dvc plots show`.", ""]
    lines += ["## Images per class", "", "| class | " + " | ".join(split_counts) + " |",
              "|---|" + "---:|" * len(split_counts)]
    for i, name in enumerate(classes):
        lines.append(f"| {name} | " + " | ".join(str(int(c[i])) for c in split_counts.values()) + " |")
    lines.append("| **total** | " + " | ".join(str(int(c.sum())) for c in split_counts.values()) + " |")
    if augmented_views:
        lines += ["", f"Heads also trained on {augmented_views} augmented view(s) of each train image "
                  "(extract.augment_views)."]
    atomic_write_text(SUMMARY, "\n".join(lines) + "\n")
    return SUMMARY
