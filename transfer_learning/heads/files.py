"""models/heads/<name>/: a trained head as files that load without unpickling code.

Logistic, linear and MLP heads are the same thing once trained: standardize, then Linear layers with ReLU
between, then softmax. They are saved as `weights.npz` (mean, scale, w0, b0, w1, b1, ...; loaded with
allow_pickle=False) plus `head.json`, and run with numpy alone. A scikit-learn estimator (`type: sklearn`) is
saved as `head.onnx` (standardization included, heads/sklearn_onnx.py) and run with ONNX Runtime on the CPU. Only
an estimator skl2onnx cannot convert, in a head with `allow_pickle: true`, is saved as a pickle (`model.pkl`).
The file's sha256 is in head.json and checked before the file is read, so a corrupt or swapped file is refused.
"""
from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transfer_learning.common.atomic import atomic_write, atomic_write_text
from transfer_learning.common.errors import UserError
from transfer_learning.common.hashing import read_verified, sha256_bytes

if TYPE_CHECKING:  # annotations only: loading and scoring a saved head does not import scikit-learn
    from sklearn.base import BaseEstimator
    from sklearn.preprocessing import StandardScaler

    from transfer_learning.params import HeadSpec

HEADS_DIR = Path("models/heads")
LAYERS, ONNX, PICKLE = "layers", "onnx", "pickle"
FILE_OF_FORMAT = {LAYERS: "weights.npz", ONNX: "head.onnx", PICKLE: "model.pkl"}
ONNX_ROWS_PER_RUN = 1024
RESTORE = "run `dvc checkout models/heads` to restore the committed heads, or `dvc repro train_heads` to retrain"


@dataclass
class FittedHead:
    """What selection (heads/selection.py) hands to `save`: the chosen estimator, its scaler and its record."""

    name: str
    spec: HeadSpec
    estimator: BaseEstimator
    scaler: StandardScaler
    chosen: dict[str, Any]
    val_accuracy: float
    candidates: list[dict[str, Any]]
    seconds: float
    train_rows: int
    details: dict[str, Any] = field(default_factory=dict)


def estimator_scores(estimator: Any, x: np.ndarray) -> np.ndarray:
    """predict_proba, or decision_function for estimators without it; N × len(estimator.classes_). Model
    selection, evaluate and predict all take the argmax of these, so val and test measure the same rule."""
    if hasattr(estimator, "predict_proba"):
        return estimator.predict_proba(x)
    scores = estimator.decision_function(x)
    return np.stack([-scores, scores], axis=1) if scores.ndim == 1 else scores


def layers_of(fitted: FittedHead) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """(weight out×in, bias) per layer, or None for an estimator that is not a stack of Linear layers."""
    estimator = fitted.estimator
    if hasattr(estimator, "layers"):
        return estimator.layers()
    if fitted.spec.type == "logistic":
        weight, bias = estimator.coef_, estimator.intercept_
        if len(estimator.classes_) == 2:  # sklearn keeps one row; softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)]
            weight, bias = np.vstack([np.zeros_like(weight), weight]), np.concatenate([[0.0], bias])
        return [(weight, bias)]
    return None


@dataclass
class SavedForm:
    """A head's files before they are written: head.json's dict and the bytes of its model file."""

    name: str
    meta: dict[str, Any]
    blob: bytes


def saved_form(fitted: FittedHead, classes: list[str], fingerprint: str) -> SavedForm:
    """Layers, else ONNX, else (with allow_pickle only) a pickle; fails naming heads.<name>.estimator when an
    estimator has no ONNX form and pickling it was not allowed."""
    meta: dict[str, Any] = {
        "name": fitted.name,
        "type": fitted.spec.type,
        "spec": fitted.spec.model_dump(),
        "chosen": fitted.chosen,
        "details": fitted.details,
        "val_accuracy": fitted.val_accuracy,
        "candidates": fitted.candidates,
        "classes": classes,
        "class_indices": [int(c) for c in fitted.estimator.classes_],
        "features_fingerprint": fingerprint,
    }
    layers = layers_of(fitted)
    if layers is not None:
        arrays = {"mean": fitted.scaler.mean_, "scale": fitted.scaler.scale_}
        for i, (weight, bias) in enumerate(layers):
            arrays[f"w{i}"], arrays[f"b{i}"] = weight, bias
        buffer = io.BytesIO()
        np.savez(buffer, **{k: np.asarray(v, np.float32) for k, v in arrays.items()})
        blob = buffer.getvalue()
        meta |= {"format": LAYERS, "layers": len(layers)}
    else:
        from transfer_learning.heads.sklearn_onnx import NoConverter, to_onnx_head
        try:
            blob = to_onnx_head(fitted.estimator, fitted.scaler.mean_, fitted.scaler.scale_, meta["class_indices"],
                                len(classes))
            meta |= {"format": ONNX, "probabilistic": hasattr(fitted.estimator, "predict_proba")}
        except NoConverter as error:
            if not getattr(fitted.spec, "allow_pickle", False):
                raise UserError(f"heads.{fitted.name}.estimator: {error}, so it cannot be saved without pickling; "
                                f"choose an estimator skl2onnx supports, or set heads.{fitted.name}.allow_pickle: "
                                "true to save it as a pickle (load it only from a source you trust)") from None
            blob = pickle.dumps({"scaler": fitted.scaler, "estimator": fitted.estimator}, protocol=5)
            meta |= {"format": PICKLE}
    meta["sha256"] = sha256_bytes(blob)
    return SavedForm(fitted.name, meta, blob)


def write(form: SavedForm, directory: Path = HEADS_DIR) -> Path:
    out = directory / form.name
    with atomic_write(out / FILE_OF_FORMAT[form.meta["format"]], "wb") as handle:
        handle.write(form.blob)
    atomic_write_text(out / "head.json", json.dumps(form.meta, indent=2, sort_keys=True) + "\n")
    return out


def save(fitted: FittedHead, classes: list[str], fingerprint: str, directory: Path = HEADS_DIR) -> Path:
    return write(saved_form(fitted, classes, fingerprint), directory)


@dataclass
class Head:
    """A saved head: `scores(features)` gives one column per class of the dataset (classes.json order)."""

    name: str
    meta: dict
    arrays: dict[str, np.ndarray] | None = None
    model: Any = None  # the unpickled {"scaler", "estimator"} of a head saved with allow_pickle
    onnx_bytes: bytes | None = None
    _session: Any = field(default=None, repr=False)

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def probabilistic(self) -> bool:
        if self.onnx_bytes is not None:
            return self.meta["probabilistic"]
        return self.arrays is not None or hasattr(self.model["estimator"], "predict_proba")

    @property
    def layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        assert self.arrays is not None, f"head {self.name} is a {self.meta['format']} head, not layers"
        return [(self.arrays[f"w{i}"], self.arrays[f"b{i}"]) for i in range(self.meta["layers"])]

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Probabilities (or decision scores for estimators without predict_proba), N × len(classes)."""
        if self.onnx_bytes is not None:  # the graph already has one column per dataset class
            if self._session is None:
                import onnxruntime as ort
                self._session = ort.InferenceSession(self.onnx_bytes, providers=["CPUExecutionProvider"])
            session, x = self._session, np.asarray(features, np.float32)
            # in chunks: skl2onnx's kNN graph holds a rows × train-rows distance matrix
            chunks = [session.run(None, {session.get_inputs()[0].name: x[start:start + ONNX_ROWS_PER_RUN]})[0]
                      for start in range(0, len(x), ONNX_ROWS_PER_RUN)]
            return np.concatenate(chunks).astype(np.float64) if chunks else np.zeros((0, len(self.classes)))
        if self.arrays is not None:
            x = (features.astype(np.float32) - self.arrays["mean"]) / self.arrays["scale"]
            layers = self.layers
            for i, (weight, bias) in enumerate(layers):
                x = x @ weight.T + bias
                if i < len(layers) - 1:
                    x = np.maximum(x, 0)
            x = np.exp(x - x.max(axis=1, keepdims=True))
            own = x / x.sum(axis=1, keepdims=True)
        else:
            own = estimator_scores(self.model["estimator"], self.model["scaler"].transform(features))
        full = np.full((len(features), len(self.classes)), 0.0 if self.probabilistic else -np.inf, np.float64)
        full[:, self.meta["class_indices"]] = own
        return full


def trained_names(directory: Path = HEADS_DIR) -> list[str]:
    return sorted(p.parent.name for p in directory.glob("*/head.json"))


def load(name: str, directory: Path = HEADS_DIR) -> Head:
    folder = directory / name
    meta_path = folder / "head.json"
    if not meta_path.is_file():
        trained = trained_names(directory)
        raise UserError(f"no trained head {name!r} in {directory}; trained: {', '.join(trained) or 'none'} "
                        "(run `dvc repro train_heads`)")
    try:
        meta = json.loads(meta_path.read_text())
        path, expected = folder / FILE_OF_FORMAT[meta["format"]], meta["sha256"]
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{meta_path} is damaged or from an older version ({error!r}): {RESTORE}") from None
    blob = read_verified(path, expected, meta_path, RESTORE)  # before numpy, ONNX Runtime or pickle reads a byte
    if meta["format"] == LAYERS:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            return Head(name, meta, arrays={k: npz[k] for k in npz.files})
    if meta["format"] == ONNX:
        return Head(name, meta, onnx_bytes=blob)
    return Head(name, meta, model=pickle.loads(blob))  # only written for a head with allow_pickle: true
