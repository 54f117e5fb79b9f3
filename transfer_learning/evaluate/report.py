"""What evaluate writes besides its metrics: confusion matrices for `dvc plots show` and as PNG, and
reports/summary.md with every model side by side, ranked by val accuracy."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfer_learning.common.atomic import atomic_write_text

CONFUSION_PLOTS = Path("plots/confusion")
CONFUSION_IMAGES = Path("reports/confusion")
SUMMARY = Path("reports/summary.md")
BEST_KEY = "best"  # metrics/evaluate.json's key naming the best model by val accuracy (no head may take the name)
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
    """Best val accuracy first: the split every head chose its hyperparameters on, and fine-tuning its best epoch,
    so picking the best there is one more selection on val and the test split stays unseen. Ties keep the order
    given (evaluate.models, or for `all` the heads alphabetically, then finetune); a model without a val
    accuracy comes last."""
    return sorted(results, key=lambda r: -r.val_accuracy if r.val_accuracy is not None else float("inf"))


def write_confusion_csv(name: str, labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> Path:
    """One row per test image, `actual,predicted` class names: the layout of DVC's confusion template."""
    CONFUSION_PLOTS.mkdir(parents=True, exist_ok=True)
    path = CONFUSION_PLOTS / f"{name}.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        writer.writerows((classes[a], classes[p]) for a, p in zip(labels, predicted))
    return path


def write_confusion_png(name: str, labels: np.ndarray, predicted: np.ndarray, classes: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    CONFUSION_IMAGES.mkdir(parents=True, exist_ok=True)
    path = CONFUSION_IMAGES / f"{name}.png"
    size = min(max(5.0, 0.5 * len(classes) + 2), 30.0)
    figure, axes = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(labels, predicted, labels=np.arange(len(classes)),
                                            display_labels=classes, xticks_rotation="vertical", colorbar=False,
                                            ax=axes)
    axes.set_title(name)
    figure.tight_layout()
    figure.savefig(path, dpi=100, metadata={"Software": None})  # no version stamp: same inputs, same bytes
    plt.close(figure)
    return path


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
