"""Out-of-fold class probabilities of the train and val images: each image's probabilities come from models that
never saw its label. Two models, averaged:

- a logistic head, k-fold (stratified, seeded) on the features projected to their first principal components
  (fitted once on every image, test included: no label goes into them) and standardized;
- the votes of its nearest neighbours (leave-one-out: an image is never its own neighbour).

On Fashion-MNIST with 5 % of the labels flipped, their mean ranks the flips as well as the neighbours and better
than the logistic head (precision@k 0.84, 0.84, 0.75) and flags them better than either (F1 0.53, 0.46, 0.52;
benchmarks/README.md, "Audit"). The projection keeps the k fits to a fraction of a second on 2,550 images. The
PCA and the fits run on one BLAS thread: at this size more threads only wait on each other (15 s instead of 0.4 s on
a loaded 2-core machine).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("audit")


@dataclass(frozen=True)
class OutOfFold:
    probabilities: np.ndarray  # (n, classes), rows sum to 1
    folds: int  # the folds used (fewer than asked when a class has fewer images)
    logistic_accuracy: float
    neighbour_accuracy: float


def projected(features: np.ndarray, dims: int, seed: int) -> np.ndarray:
    """The first `dims` principal components of `features` (randomized SVD, seeded, on one BLAS thread), largest
    first."""
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    dims = max(1, min(dims, features.shape[1], len(features) - 1))
    with threadpool_limits(1):
        return PCA(dims, svd_solver="randomized", random_state=seed).fit_transform(np.asarray(features, np.float32))


def logistic_out_of_fold(features: np.ndarray, labels: np.ndarray, classes: int, folds: int, seed: int,
                         C: float) -> np.ndarray:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    probabilities = np.zeros((len(labels), classes))
    for fit, held_out in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, labels):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter bounds the time; the fit is still used
            model = LogisticRegression(C=C, max_iter=500).fit(features[fit], labels[fit])
        probabilities[np.ix_(held_out, model.classes_)] = model.predict_proba(features[held_out])
    return probabilities


def neighbour_votes(neighbour_labels: np.ndarray, classes: int) -> np.ndarray:
    """Class shares among each row's neighbours, smoothed by one vote spread over the classes (no zero)."""
    counts = np.stack([(neighbour_labels == c).sum(axis=1) for c in range(classes)], axis=1).astype(np.float64)
    return (counts + 1.0 / classes) / (neighbour_labels.shape[1] + 1.0)


def usable_folds(labels: np.ndarray, classes: int, folds: int) -> int:
    """`folds`, or fewer when the smallest class has fewer images (a warning says so): each fold must hold out
    one image of every class."""
    smallest = int(np.bincount(labels, minlength=classes)[np.unique(labels)].min())
    if smallest < folds:
        log.warning("audit.folds is %d, but the smallest class has %d train+val image(s): %d folds used",
                    folds, smallest, max(smallest, 2))
    return max(2, min(folds, smallest))


def out_of_fold(components: np.ndarray, labels: np.ndarray, neighbour_labels: np.ndarray, classes: int, *,
                folds: int, seed: int, C: float) -> OutOfFold:
    """The averaged out-of-fold probabilities of the logistic head (on `components`, the images' principal
    components) and the neighbours' votes."""
    from threadpoolctl import threadpool_limits

    used = usable_folds(labels, classes, folds)
    standardized = components / np.maximum(components.std(axis=0), 1e-12)
    with threadpool_limits(1):
        logistic = logistic_out_of_fold(standardized, labels, classes, used, seed, C)
    votes = neighbour_votes(neighbour_labels, classes)
    return OutOfFold((logistic + votes) / 2, used, float((logistic.argmax(1) == labels).mean()),
                     float((votes.argmax(1) == labels).mean()))
