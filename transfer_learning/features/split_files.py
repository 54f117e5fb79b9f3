"""data/features/{train,val,test}.h5: the per-split feature files that heads read (regular DVC outputs)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from transfer_learning.common.errors import UserError
from transfer_learning.features.store import KEY_DTYPE, out_of_space, whole_h5_file

FEATURES_DIR = Path("data/features")


@dataclass(frozen=True)
class SplitRows:
    keys: list[str]
    paths: list[str]
    labels: list[int]
    views: list[int]


def write_split(path: Path, rows: SplitRows, chunks: Iterator[np.ndarray], *, fingerprint: str,
                classes: list[str], feature_dim: int, dtype: str) -> None:
    """Streams `chunks` (features in the order of rows) into one file that appears only once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(rows.keys)
    try:
        with whole_h5_file(path) as handle:
            features = handle.create_dataset("features", shape=(n, feature_dim), dtype=dtype)
            start = 0
            for chunk in chunks:
                features[start:start + len(chunk)] = chunk
                start += len(chunk)
            assert start == n, f"{start} feature rows for {n} keys"
            handle.create_dataset("labels", data=np.array(rows.labels, dtype=np.int64))
            handle.create_dataset("views", data=np.array(rows.views, dtype=np.int32))
            handle.create_dataset("keys", data=np.array(rows.keys, dtype=KEY_DTYPE))
            handle.create_dataset("paths", data=rows.paths, dtype=h5py.string_dtype())
            handle.attrs.update(fingerprint=fingerprint, classes=classes, feature_dim=feature_dim)
    except BaseException as error:
        if out_of_space(error):
            raise UserError(f"no space left on the disk for {path}: its {n} rows need "
                            f"{n * feature_dim * np.dtype(dtype).itemsize / 1e6:.1f} MB; free some space, then run "
                            "again (every row stays in the feature store)") from None
        raise


@dataclass(frozen=True)
class SplitFeatures:
    features: np.ndarray
    labels: np.ndarray
    views: np.ndarray
    paths: list[str]
    classes: list[str]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.labels)

    def plain(self) -> SplitFeatures:
        """Only view 0 of every image: the rows to score a model on."""
        keep = self.views == 0
        return SplitFeatures(self.features[keep], self.labels[keep], self.views[keep],
                             [p for p, k in zip(self.paths, keep) if k], self.classes, self.fingerprint)


def read_split(split: str, directory: Path = FEATURES_DIR) -> SplitFeatures:
    path = directory / f"{split}.h5"
    if not path.is_file():
        raise UserError(f"{path} not found: run `dvc repro extract` first")
    with h5py.File(path, "r") as handle:
        return SplitFeatures(
            features=handle["features"][:].astype(np.float32, copy=False),
            labels=handle["labels"][:],
            views=handle["views"][:],
            paths=[p.decode() if isinstance(p, bytes) else p for p in handle["paths"][:]],
            classes=[str(c) for c in handle.attrs["classes"]],
            fingerprint=str(handle.attrs["fingerprint"]),
        )


def read_labels(split: str, directory: Path = FEATURES_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(labels, views) of a split, without reading its features."""
    path = directory / f"{split}.h5"
    if not path.is_file():
        raise UserError(f"{path} not found: run `dvc repro extract` first")
    with h5py.File(path, "r") as handle:
        return handle["labels"][:], handle["views"][:]


def read_plain_keys(split: str, directory: Path = FEATURES_DIR) -> list[str]:
    """The store keys of a split's view-0 rows, in the order of `read_split(split).plain()`."""
    path = directory / f"{split}.h5"
    with h5py.File(path, "r") as handle:
        keep = handle["views"][:] == 0
        return [k.decode() for k in handle["keys"][:][keep]]
