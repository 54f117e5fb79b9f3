"""The test-split metrics every model gets, from its per-class scores.

numpy only: these are the definitions of scikit-learn's accuracy_score, balanced_accuracy_score, f1_score
(average="macro", zero_division=0), top_k_accuracy_score and log_loss (tests/test_heads.py checks them against
scikit-learn), without the 1-3 s its import costs evaluate on every heads edit.
"""
from __future__ import annotations

import numpy as np

TOP_K = 5


def _per_class_counts(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> tuple[np.ndarray, ...]:
    """(true positives, true count, predicted count) per class."""
    true_positives = np.bincount(labels[labels == predicted], minlength=n_classes)
    return true_positives, np.bincount(labels, minlength=n_classes), np.bincount(predicted, minlength=n_classes)


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> float:
    """The mean recall over the classes present in `labels`."""
    true_positives, true_count, _ = _per_class_counts(labels, predicted, n_classes)
    present = true_count > 0
    return float(np.mean(true_positives[present] / true_count[present]))


def macro_f1(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> float:
    """The mean F1 over all n_classes classes; a class never true nor predicted counts 0."""
    true_positives, true_count, predicted_count = _per_class_counts(labels, predicted, n_classes)
    both = true_count + predicted_count  # F1 = 2 tp / (2 tp + fp + fn)
    f1 = np.divide(2 * true_positives, both, out=np.zeros(n_classes), where=both > 0)
    return float(np.mean(f1))


def top_k_accuracy(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Whether the true class is among the k highest scores; ties ranked as scikit-learn ranks them (stable
    ascending sort, reversed: of equal scores the higher class index ranks first)."""
    ranked = np.argsort(scores, axis=1, kind="mergesort")[:, ::-1][:, :k]
    return float(np.mean((ranked == labels[:, None]).any(axis=1)))


def log_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean -log p(true class), p clipped to [eps, 1 - eps] of float64."""
    eps = np.finfo(np.float64).eps
    chosen = np.clip(probabilities[np.arange(len(labels)), labels].astype(np.float64), eps, 1 - eps)
    return float(np.mean(-np.log(chosen)))


def score(labels: np.ndarray, scores: np.ndarray, probabilistic: bool) -> dict[str, float]:
    """accuracy, balanced_accuracy, macro_f1; top5_accuracy with more than 5 classes; log_loss when `scores`
    are probabilities. `scores` is N × classes, one column per class in classes.json order."""
    labels = np.asarray(labels, dtype=np.int64)
    n_classes = scores.shape[1]
    predicted = scores.argmax(axis=1)
    values = {
        "accuracy": float(np.mean(predicted == labels)),
        "balanced_accuracy": balanced_accuracy(labels, predicted, n_classes),
        "macro_f1": macro_f1(labels, predicted, n_classes),
    }
    if n_classes > TOP_K:
        finite = np.where(np.isfinite(scores), scores, np.finfo(np.float64).min)
        values["top5_accuracy"] = top_k_accuracy(labels, finite, TOP_K)
    if probabilistic:  # float32 softmax sums to 1 only within 1e-7
        values["log_loss"] = log_loss(labels, scores / scores.sum(axis=1, keepdims=True))
    return {name: round(float(value), 6) for name, value in values.items()}
