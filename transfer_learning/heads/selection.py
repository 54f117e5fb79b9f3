"""Heads on cached features: every head type becomes a scikit-learn classifier plus a grid, and one selection
path fits each grid point on train, scores it on val, and keeps the best (the first one on a tie).

Features are standardized (mean/std of train) for every head: the linear-probe protocol of CLIP/DINOv2, and
what makes one learning rate or C grid fit features of any scale.
"""
from __future__ import annotations

import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

# scikit-learn imports pandas when it is installed (Ray Data needs it) only to keep it at hand (sklearn.utils.fixes);
# no head uses it. Hidden while scikit-learn is first imported, importable again after: ~0.2 s of every process that
# fits heads (train_heads@<name> after each head edit, the layer sweep).
PANDAS_HIDDEN = "pandas" not in sys.modules
if PANDAS_HIDDEN:
    sys.modules["pandas"] = None  # `import pandas` raises ImportError, which scikit-learn expects
try:
    from sklearn.base import BaseEstimator, clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import ParameterGrid
    from sklearn.preprocessing import StandardScaler
    from sklearn.utils.validation import has_fit_parameter
finally:
    if PANDAS_HIDDEN:
        del sys.modules["pandas"]

from transfer_learning.common.errors import UserError
from transfer_learning.features.split_files import SplitFeatures
from transfer_learning.heads.files import FittedHead, estimator_scores
from transfer_learning.params import LinearHead, LogisticHead, MLPHead, SklearnHead

log = logging.getLogger(__name__)

Spec = LogisticHead | LinearHead | MLPHead | SklearnHead


def estimator_and_grid(name: str, spec: Spec) -> tuple[BaseEstimator, dict[str, list[Any]]]:
    """The unfitted estimator a spec describes and the grid to select on val; fails naming the params key."""
    if isinstance(spec, LogisticHead):
        return (LogisticRegression(max_iter=spec.max_iter, class_weight=spec.class_weight, random_state=spec.seed),
                {"C": list(spec.C)})
    if isinstance(spec, (LinearHead, MLPHead)):
        from transfer_learning.heads.torch_heads import TorchHead  # here: a logistic or sklearn head needs no torch

        hidden = list(spec.hidden) if isinstance(spec, MLPHead) else []
        dropout = spec.dropout if isinstance(spec, MLPHead) else 0.0
        return (TorchHead(hidden=hidden, dropout=dropout, epochs=spec.epochs, lr=spec.lr,
                          weight_decay=spec.weight_decay, batch_size=spec.batch_size, patience=spec.patience,
                          class_weight=spec.class_weight, random_state=spec.seed), {})
    try:
        estimator = spec.new_estimator()
    except ValueError as error:
        raise UserError(f"heads.{name}.estimator: {error}") from None
    class_name = type(estimator).__name__
    valid = estimator.get_params()
    for key in (*spec.params, *spec.grid):
        if key not in valid:
            where = "params" if key in spec.params else "grid"
            raise UserError(f"heads.{name}.{where}.{key}: {class_name} has no parameter {key!r}; "
                            f"valid: {', '.join(sorted(valid))}")
    chosen = {**spec.params}
    if spec.class_weight is not None:
        if "class_weight" not in valid:
            raise UserError(f"heads.{name}.class_weight: {class_name} does not support class weights; remove the key")
        chosen["class_weight"] = spec.class_weight
    if "random_state" in valid and "random_state" not in spec.params and "random_state" not in spec.grid:
        chosen["random_state"] = spec.seed
    return estimator.set_params(**chosen), {k: list(v) for k, v in spec.grid.items()}


def check_fits_the_data(name: str, spec: Spec, estimator: BaseEstimator, grid: dict[str, list[Any]],
                        train_rows: int) -> None:
    """Before any fit: a value the train split cannot support fails naming its key. A neighbours estimator votes
    among its n_neighbors nearest train rows, so it cannot ask for more rows than there are (scikit-learn would
    fit it, then fail on its first prediction)."""
    if "n_neighbors" not in estimator.get_params():
        return
    params, default = getattr(spec, "params", {}), ""
    if "n_neighbors" in grid:
        key, values = f"heads.{name}.grid.n_neighbors", grid["n_neighbors"]
    else:
        key, values = f"heads.{name}.params.n_neighbors", [estimator.get_params()["n_neighbors"]]
        if "n_neighbors" not in params:
            default = f" ({type(estimator).__name__}'s default: the key is not set)"
    too_many = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > train_rows]
    if too_many:
        raise UserError(f"{key}: {', '.join(map(str, too_many))} neighbours asked for{default}, and the train split "
                        f"has {train_rows} rows (data/features/train.h5); valid: 1 to {train_rows}")


def fit_head(name: str, spec: Spec, train: SplitFeatures, val: SplitFeatures, workers: int = 1) -> FittedHead:
    """The shared selection path: every grid point fitted on train, scored on val, the best one kept (the first on
    a tie, in the grid's order). `workers` threads fit the grid points of a scikit-learn estimator side by side,
    each on one BLAS thread: every fit is the same computation as alone, so the result does not depend on them."""
    if len(val) == 0:
        raise UserError("the val split is empty, and heads choose their hyperparameters on it: "
                        "set data.val_fraction above 0")
    started = time.perf_counter()
    estimator, grid = estimator_and_grid(name, spec)
    check_fits_the_data(name, spec, estimator, grid, len(train))
    scaler = StandardScaler().fit(train.features)
    train_x, val_x = scaler.transform(train.features), scaler.transform(val.features)
    points = list(ParameterGrid(grid))
    torch_head = has_fit_parameter(estimator, "validation")  # torch's own threads, one fit at a time

    def fitted(point: dict) -> BaseEstimator:
        candidate = clone(estimator).set_params(**point)
        try:
            if torch_head:
                return candidate.fit(train_x, train.labels, validation=(val_x, val.labels))
            return candidate.fit(train_x, train.labels)
        except (ValueError, TypeError) as error:
            raise UserError(f"heads.{name}: fitting {type(candidate).__name__} with {point or spec} failed: "
                            f"{error}") from None

    if torch_head:
        fits = [fitted(point) for point in points]
    else:
        # one BLAS thread per fit: these matrices are too small to gain from more (lbfgs on 2,100 x 1,280 features:
        # 0.3 s on one thread, 7-9 s on two of a busy 2-core machine), and the result no longer depends on the
        # machine's core count; the grid points run side by side instead (numpy and BLAS release the GIL)
        with threadpool_limits(limits=1, user_api="blas"):
            if min(workers, len(points)) > 1:
                with ThreadPoolExecutor(min(workers, len(points))) as pool:
                    fits = list(pool.map(fitted, points))
            else:
                fits = [fitted(point) for point in points]
    best: tuple[float, BaseEstimator, dict] | None = None
    candidates = []
    for point, candidate in zip(points, fits):
        try:
            predicted = candidate.classes_[estimator_scores(candidate, val_x).argmax(axis=1)]
        except (ValueError, TypeError) as error:
            raise UserError(f"heads.{name}: scoring {type(candidate).__name__} with {point or spec} on the val split "
                            f"failed: {error}") from None
        accuracy = float(np.mean(predicted == val.labels))
        candidates.append({"params": point, "val_accuracy": accuracy})
        log.info("head %s: %s val accuracy %.4f", name, point or "(no grid)", accuracy)
        if best is None or accuracy > best[0]:
            best = (accuracy, candidate, point)
    assert best is not None
    accuracy, chosen, point = best
    details = {k: getattr(chosen, k) for k in ("best_epoch_", "epochs_run_") if hasattr(chosen, k)}
    return FittedHead(name, spec, chosen, scaler, point, accuracy, candidates,
                      time.perf_counter() - started, len(train), {k.rstrip("_"): v for k, v in details.items()})
