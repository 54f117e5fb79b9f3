"""plots/finetune/ (dvclive): the fine-tune loop's curves per epoch. Imports no torch: a skipped stage writes them
too (with no rows)."""
from __future__ import annotations

from pathlib import Path

from transfer_learning.common import curves

PLOTS_DIR = Path("plots/finetune")
CURVES = ("train_loss", "val_loss", "train_accuracy", "val_accuracy")


def write_curves(history: list[dict]) -> None:
    """A curve per epoch, step = epoch; epoch 0, before any update, has the val curves only. Its metrics.json holds
    the last epoch; metrics/finetune.json the best one."""
    curves.write_curves(PLOTS_DIR, ((r["epoch"], c, r[c]) for r in history for c in CURVES if r[c] is not None),
                        empty=CURVES)
