"""The audit stage's work: data/features/{train,val,test}.h5 + the manifest -> what audit/report.py writes.

Every image's view-0 features are read once; one pass of exact nearest-neighbour search (audit/neighbours.py)
serves the neighbours' votes, the near-copies and the outliers; one PCA of every image serves the logistic head's
k fits and the map. A few seconds on the default 3,000 images on 2 CPU cores (benchmarks/README.md, "Audit")."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from transfer_learning.audit.confident_learning import LabelIssues, find_label_issues
from transfer_learning.audit.near_copies import NEXT, NearCopies, near_copies
from transfer_learning.audit.neighbours import nearest, unit_rows
from transfer_learning.audit.out_of_fold import OutOfFold, out_of_fold, projected
from transfer_learning.audit.outliers import TYPICAL_NEIGHBOURS, Outliers, outliers
from transfer_learning.audit.projection import project
from transfer_learning.common.errors import UserError
from transfer_learning.data import manifest
from transfer_learning.features.split_files import read_split
from transfer_learning.params import AuditParams

log = logging.getLogger("audit")
LABELLED = ("train", "val")
# above this many images the neighbours are searched on SEARCH_DIMS principal components, not on the features (5x
# fewer operations; on the default data 97.5 % instead of 98.5 % of 200 JPEG copies found, 0.37 % instead of 0.53 %
# of images wrongly paired), their k largest similarities found by torch.topk (audit/neighbours.py)
EXACT_SEARCH_MAX = 20_000
SEARCH_DIMS = 256  # label issues are looked for here; test is scored, never cleaned by its own model


@dataclass(frozen=True)
class Images:
    features: np.ndarray  # (n, D), every split's view-0 rows: train, val, test in that order
    labels: np.ndarray
    splits: list[str]
    paths: list[str]
    sha256: list[str]
    classes: list[str]

    @property
    def labelled(self) -> np.ndarray:
        return np.isin(np.array(self.splits, dtype=object), LABELLED)


@dataclass(frozen=True)
class AuditResult:
    images: Images
    out_of_fold: OutOfFold | None  # None when train+val has too few images (the log and metrics say so)
    issues: LabelIssues | None
    copies: NearCopies
    outliers: Outliers
    points: np.ndarray  # (n, 2), the map
    seconds: dict[str, float]
    search_dims: int  # the dimensions the neighbours were searched in


def read_images() -> Images:
    features, labels, splits, paths, classes = [], [], [], [], None
    for split in manifest.SPLITS:
        rows = read_split(split).plain()
        classes = classes or rows.classes
        features.append(rows.features)
        labels.append(rows.labels)
        splits += [split] * len(rows)
        paths += rows.paths
    by_path = {row.path: row.sha256 for row in manifest.read()}
    missing = [path for path in paths if path not in by_path]
    if missing:
        raise UserError(f"{len(missing)} image(s) of data/features are not in {manifest.MANIFEST} (e.g. "
                        f"{missing[0]}): the features are older than the manifest; run `dvc repro extract`")
    return Images(np.concatenate(features), np.concatenate(labels).astype(np.int64), splits, paths,
                  [by_path[path] for path in paths], list(classes or []))


def audit(params: AuditParams) -> AuditResult:
    seconds: dict[str, float] = {}
    started = last = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        seconds[name] = round(now - last, 3)
        last = now

    images = read_images()
    lap("read")
    searched = images.features
    if len(images.features) > EXACT_SEARCH_MAX and images.features.shape[1] > SEARCH_DIMS:
        log.info("%d images (more than %d): neighbours searched on their %d principal components, with "
                 "torch.topk", len(images.features), EXACT_SEARCH_MAX, SEARCH_DIMS)
        searched = projected(images.features, SEARCH_DIMS, params.seed)
    unit = unit_rows(searched)
    labelled = images.labelled
    (votes_index, votes_similarity), (copy_index, copy_similarity) = nearest(
        unit, unit, np.arange(len(unit)), [(max(params.neighbors, TYPICAL_NEIGHBOURS), labelled), (NEXT + 1, None)],
        fast_top_k=searched is not images.features)
    lap("neighbours")
    components = searched[:, :params.dims] if searched is not images.features else \
        projected(images.features, max(params.dims, 2), params.seed)
    lap("pca")

    rows = np.flatnonzero(labelled)
    label_counts = np.bincount(images.labels[rows], minlength=len(images.classes))
    if len(rows) < 2 * len(images.classes) or (label_counts > 0).sum() < 2:
        log.warning("%d train+val images in %d classes: too few to look for label issues (at least 2 per "
                    "class are needed); near-copies and outliers are still listed", len(rows),
                    int((label_counts > 0).sum()))
        oof, issues = None, None
    else:
        # votes_index holds indices into every image, of labelled ones only; they stand for labels here
        oof = out_of_fold(components[rows, :params.dims], images.labels[rows],
                          images.labels[votes_index[rows, :params.neighbors]], len(images.classes),
                          folds=params.folds, seed=params.seed, C=params.C)
        issues = find_label_issues(oof.probabilities, images.labels[rows], params.rank_by)
    lap("label_issues")
    copies = near_copies(copy_index, copy_similarity, images.splits, params.near_copy_z)
    found_outliers = outliers(votes_similarity, params.outlier_z)
    lap("near_copies_outliers")
    points = project(unit, components, params.map, params.seed)
    lap("map")
    seconds["compute"] = round(time.perf_counter() - started, 3)
    return AuditResult(images, oof, issues, copies, found_outliers, points, seconds, int(unit.shape[1]))
