"""Outliers: images far from every class, i.e. whose features have low cosine similarity to their nearest train and
val images (whatever their class). The threshold is the data's own: the typicality's median minus `audit.outlier_z`
robust standard deviations, as for near-copies (audit/near_copies.py)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from transfer_learning.audit.near_copies import robust_threshold

TYPICAL_NEIGHBOURS = 10  # the nearest train/val images whose mean similarity is an image's typicality


@dataclass(frozen=True)
class Outliers:
    flagged: np.ndarray  # indices, least typical first
    typicality: np.ndarray  # every image's mean similarity to its nearest train/val images
    threshold: float


def outliers(similarities: np.ndarray, z: float) -> Outliers:
    typicality = similarities[:, :TYPICAL_NEIGHBOURS].astype(np.float64).mean(axis=1)
    threshold, _, _ = robust_threshold(typicality, z)
    flagged = np.flatnonzero(typicality < threshold)
    return Outliers(flagged[np.argsort(typicality[flagged], kind="stable")], typicality, threshold)
