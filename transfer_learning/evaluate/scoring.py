"""The test-split metrics every model gets, from its per-class scores."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, log_loss, top_k_accuracy_score

TOP_K = 5


def score(labels: np.ndarray, scores: np.ndarray, probabilistic: bool) -> dict[str, float]:
    """accuracy, balanced_accuracy, macro_f1; top5_accuracy with more than 5 classes; log_loss when `scores`
    are probabilities. `scores` is N × classes, one column per class in classes.json order."""
    n_classes = scores.shape[1]
    everything = np.arange(n_classes)
    predicted = scores.argmax(axis=1)
    values = {
        "accuracy": accuracy_score(labels, predicted),
        "balanced_accuracy": balanced_accuracy_score(labels, predicted),
        "macro_f1": f1_score(labels, predicted, labels=everything, average="macro", zero_division=0),
    }
    if n_classes > TOP_K:
        finite = np.where(np.isfinite(scores), scores, np.finfo(np.float64).min)
        values["top5_accuracy"] = top_k_accuracy_score(labels, finite, k=TOP_K, labels=everything)
    if probabilistic:  # float32 softmax sums to 1 only within 1e-7, which log_loss warns about
        values["log_loss"] = log_loss(labels, scores / scores.sum(axis=1, keepdims=True), labels=everything)
    return {name: round(float(value), 6) for name, value in values.items()}
