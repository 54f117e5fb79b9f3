"""Confident learning (Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty in Dataset Labels",
JAIR 70, 2021), written here from the paper's definitions:

1. per-class thresholds: t_j, the mean probability of class j over the images labelled j (self-confidence);
2. the confident joint C[i][j]: the images labelled i whose most probable class among those at or above their
   threshold is j (images with no class at or above its threshold are not counted);
3. calibration: each row of C rescaled to the number of images labelled i, then C divided by its sum: Q, the
   estimated joint distribution of given and true labels;
4. pruning by noise rate: for each off-diagonal (i, j), the n·Q[i][j] images labelled i with the largest margin
   p_j − p_i are label issues (suggested label j).

The issues are then ranked by self-confidence (the probability of the given label, lowest first) or by the
normalized margin (that probability minus the largest other one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

RankBy = Literal["self_confidence", "normalized_margin"]


@dataclass(frozen=True)
class LabelIssues:
    flagged: np.ndarray  # indices of the label issues, most likely first
    suggested: np.ndarray  # (n,) the label the model suggests for every image (its pruning pair's j when flagged)
    thresholds: np.ndarray  # t_j
    joint: np.ndarray  # Q: calibrated joint of given (rows) and true (columns) labels, sums to 1


def thresholds(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """t_j = mean p_j over the images labelled j; a class no image is labelled with gets 1 (never reached...
    unless a probability is exactly 1, which then still names that class)."""
    classes = probabilities.shape[1]
    return np.array([probabilities[labels == j, j].mean() if (labels == j).any() else 1.0 for j in range(classes)])


def confident_joint(probabilities: np.ndarray, labels: np.ndarray, per_class: np.ndarray) -> np.ndarray:
    """C[i][j]: images labelled i whose likeliest class at or above its threshold is j."""
    classes = probabilities.shape[1]
    above = probabilities >= per_class
    counted = above.any(axis=1)
    likeliest = np.where(above, probabilities, -np.inf).argmax(axis=1)
    joint = np.zeros((classes, classes), np.int64)
    np.add.at(joint, (labels[counted], likeliest[counted]), 1)
    return joint


def calibrated(joint: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Q: each row of the confident joint rescaled to its label's count, the whole divided by its sum."""
    counts = np.bincount(labels, minlength=len(joint)).astype(np.float64)
    rows = joint.sum(axis=1, keepdims=True).astype(np.float64)
    scaled = np.divide(joint, rows, out=np.zeros(joint.shape), where=rows > 0) * counts[:, None]
    total = scaled.sum()
    return scaled / total if total else scaled


def prune_by_noise_rate(probabilities: np.ndarray, labels: np.ndarray, joint: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(mask of the label issues, the pair's j per image: -1 where none): for each off-diagonal (i, j), the
    round(n·Q[i][j]) images labelled i with the largest margin p_j − p_i. An image taken by several pairs keeps
    the j of its largest margin."""
    n, classes = probabilities.shape
    flagged = np.zeros(n, bool)
    best_margin = np.full(n, -np.inf)
    pair = np.full(n, -1)
    for i in range(classes):
        members = np.flatnonzero(labels == i)
        for j in range(classes):
            take = int(round(n * joint[i, j]))
            if i == j or take == 0 or not len(members):
                continue
            margin = probabilities[members, j] - probabilities[members, i]
            chosen = members[np.argsort(-margin, kind="stable")[:take]]
            flagged[chosen] = True
            wider = probabilities[chosen, j] - probabilities[chosen, i] > best_margin[chosen]
            best_margin[chosen[wider]] = (probabilities[chosen, j] - probabilities[chosen, i])[wider]
            pair[chosen[wider]] = j
    return flagged, pair


def ranking_score(probabilities: np.ndarray, labels: np.ndarray, rank_by: RankBy) -> np.ndarray:
    """Lower is more likely a label issue: p_given, or p_given minus the largest other probability."""
    given = probabilities[np.arange(len(labels)), labels]
    if rank_by == "self_confidence":
        return given
    others = probabilities.copy()
    others[np.arange(len(labels)), labels] = -np.inf
    return given - others.max(axis=1)


def find_label_issues(probabilities: np.ndarray, labels: np.ndarray, rank_by: RankBy) -> LabelIssues:
    """Confident learning's label issues of out-of-fold `probabilities`, most likely first."""
    per_class = thresholds(probabilities, labels)
    joint = calibrated(confident_joint(probabilities, labels, per_class), labels)
    flagged, pair = prune_by_noise_rate(probabilities, labels, joint)
    others = probabilities.copy()
    others[np.arange(len(labels)), labels] = -np.inf
    suggested = np.where(pair >= 0, pair, others.argmax(axis=1))
    score = ranking_score(probabilities, labels, rank_by)
    issues = np.flatnonzero(flagged)
    return LabelIssues(issues[np.argsort(score[issues], kind="stable")], suggested, per_class, joint)
