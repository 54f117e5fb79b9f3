"""What evaluate writes besides its metrics: confusion matrices for `dvc plots show` and as PNG, and
reports/summary.md with every model side by side."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CONFUSION_PLOTS = Path("plots/confusion")
CONFUSION_IMAGES = Path("reports/confusion")
SUMMARY = Path("reports/summary.md")
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
    """A table of every model, the best test accuracy marked ★, then the images per class and split."""
    best = max((r.metrics["accuracy"] for r in results), default=None)
    columns = [(key, title) for key, title in COLUMNS if any(key in r.metrics for r in results)]
    lines = ["# Models side by side (test split)", ""]
    lines.append("| model | kind | " + " | ".join(t for _, t in columns) + " | val accuracy | chosen | train s |")
    lines.append("|---|---|" + "---:|" * len(columns) + "---:|---|---:|")
    for r in sorted(results, key=lambda r: -r.metrics["accuracy"]):
        mark = " ★" if r.metrics["accuracy"] == best else ""
        cells = [_number(r.metrics.get(key)) for key, _ in columns]
        lines.append(f"| {r.name}{mark} | {r.kind} | " + " | ".join(cells)
                     + f" | {_number(r.val_accuracy)} | {r.chosen} | {_number(r.train_seconds, 1)} |")
    lines += ["", "★ best test accuracy. Heads choose their hyperparameters on the val split only; confusion "
              "matrices: `reports/confusion/<model>.png`, `dvc plots show`.", ""]
    lines += ["## Images per class", "", "| class | " + " | ".join(split_counts) + " |",
              "|---|" + "---:|" * len(split_counts)]
    for i, name in enumerate(classes):
        lines.append(f"| {name} | " + " | ".join(str(int(c[i])) for c in split_counts.values()) + " |")
    lines.append("| **total** | " + " | ".join(str(int(c.sum())) for c in split_counts.values()) + " |")
    if augmented_views:
        lines += ["", f"Heads also trained on {augmented_views} augmented view(s) of each train image "
                  "(extract.augment_views)."]
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    SUMMARY.write_text("\n".join(lines) + "\n")
    return SUMMARY
