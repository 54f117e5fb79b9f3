"""Near-copies: pairs of images whose features are much closer to each other than to anything else (a re-encoded,
resized or lightly edited copy), within and across splits. A copy of a test image in train makes every test
accuracy optimistic.

Cosine similarity alone cannot tell them apart: on Fashion-MNIST, JPEG copies (quality 90) of an image have cosine
0.946-0.99 to it, while the nearest distinct image reaches 0.981. What sets a copy apart is its distance to its
nearest neighbour relative to the next ones: score = log(d1 / mean(d2..d11)), d = 1 − cosine (about −1.7 for a
copy, −0.2 for a typical image). The threshold is calibrated on the data itself: the score's median minus
`audit.near_copy_z` robust standard deviations (1.4826 × the median absolute deviation), both measured on every
image, which a few percent of copies do not move. benchmarks/README.md ("Audit") gives the share of planted copies
found and of images wrongly paired at the default z.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEXT = 10  # the neighbours after the nearest whose mean distance the nearest's is compared with
MIN_DISTANCE = 1e-6  # cosine distance floor: an exact copy (distance 0) gets the lowest score, not log(0)
# the member of a pair to drop: keep the test image over val and train, the val image over train
KEEP_FIRST = {"test": 0, "val": 1, "train": 2}


@dataclass(frozen=True)
class NearCopies:
    pairs: list[tuple[int, int, float, float]]  # (drop, keep, cosine, score), most certain first
    scores: np.ndarray  # every image's score
    threshold: float
    median: float
    spread: float  # 1.4826 x MAD


def scores(similarities: np.ndarray) -> np.ndarray:
    """log(d1 / mean(d2..d11)) per row of nearest-first similarities."""
    distances = np.maximum(1.0 - similarities.astype(np.float64), MIN_DISTANCE)
    return np.log(distances[:, 0] / distances[:, 1:NEXT + 1].mean(axis=1))


def robust_threshold(values: np.ndarray, z: float) -> tuple[float, float, float]:
    """(median − z·spread, median, spread), spread = 1.4826 × the median absolute deviation."""
    median = float(np.median(values))
    spread = float(1.4826 * np.median(np.abs(values - median)))
    return median - z * spread, median, spread


def near_copies(indices: np.ndarray, similarities: np.ndarray, splits: list[str], z: float) -> NearCopies:
    """Pairs (image, its nearest neighbour) whose score is below the calibrated threshold, each pair once, oriented
    so that the first member is the one to drop (test over val over train kept; within a split, the later one)."""
    if similarities.shape[1] < 2:
        return NearCopies([], np.zeros(len(similarities)), float("-inf"), 0.0, 0.0)
    score = scores(similarities)
    threshold, median, spread = robust_threshold(score, z)
    pairs: dict[tuple[int, int], tuple[int, int, float, float]] = {}
    for i in np.flatnonzero(score < threshold):
        j = int(indices[i, 0])
        keep, drop = sorted((int(i), j), key=lambda k: (KEEP_FIRST[splits[k]], k))
        found = (drop, keep, float(similarities[i, 0]), float(score[i]))
        if (key := (min(i, j), max(i, j))) not in pairs or found[3] < pairs[key][3]:
            pairs[key] = found
    return NearCopies(sorted(pairs.values(), key=lambda p: p[3]), score, threshold, median, spread)


def leaks(pairs: list[tuple[int, int, float, float]], splits: list[str]) -> dict[str, int]:
    """Images of val and test with a near-copy in train (and of test with one in val): each counted once."""
    found: dict[str, set[int]] = {"test_with_train_copy": set(), "val_with_train_copy": set(),
                                  "test_with_val_copy": set()}
    for drop, keep, _, _ in pairs:
        between = {splits[drop]: drop, splits[keep]: keep}
        for key, (held, seen) in (("test_with_train_copy", ("test", "train")),
                                  ("val_with_train_copy", ("val", "train")),
                                  ("test_with_val_copy", ("test", "val"))):
            if held in between and seen in between and held != seen:
                found[key].add(between[held])
    return {key: len(images) for key, images in found.items()}
