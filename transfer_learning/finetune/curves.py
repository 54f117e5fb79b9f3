"""plots/finetune/ (dvclive): the fine-tune loop's curves per epoch. Imports no torch: a skipped stage writes its
note in their place."""
from __future__ import annotations

from pathlib import Path

from transfer_learning.common import curves

PLOTS_DIR = Path("plots/finetune")
CURVES = ("train_loss", "val_loss", "train_accuracy", "val_accuracy")


def write_curves(history: list[dict]) -> None:
    """A curve per epoch, step = epoch; epoch 0, before any update, has the val curves only (metrics/finetune.json
    holds the best epoch). No history (finetune.enabled: false): no curve, a note saying why."""
    curves.write_curves(PLOTS_DIR, ((r["epoch"], c, r[c]) for r in history for c in CURVES if r[c] is not None),
                        nothing_to_plot="finetune.enabled is false: nothing was fine-tuned, so there is no curve.")
