"""The chosen model: the one with the best val accuracy, the split every head chose its hyperparameters on (and
fine-tuning its best epoch), so picking among the models there is one more selection on val and the test split
stays unseen. One rule for evaluate (the ★ of reports/summary.md, `best` in metrics/evaluate.json) and for
predict and --deploy, which serve evaluate's choice by default."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

Model = TypeVar("Model")
BEST_KEY = "best"  # metrics/evaluate.json's key naming the chosen model (no head may take the name)
EVALUATE_METRICS = Path("metrics/evaluate.json")


def best_first(models: Sequence[Model], val_accuracy: Callable[[Model], float | None]) -> list[Model]:
    """`models` by val accuracy, best first. Ties keep the order given (evaluate.models, or for `all` the heads
    alphabetically, then finetune); a model without a val accuracy comes last."""
    def key(model: Model) -> float:
        value = val_accuracy(model)
        return -value if value is not None else math.inf

    return sorted(models, key=key)
