"""data/features/{train,val,test}.h5: the per-split feature files that heads read (regular DVC outputs).

Each file records the sha256 of its datasets' bytes in its attrs (`<name>_sha256`); every read checks them and
that the features are finite, so a damaged or hand-edited file is refused, never silently trained on.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from transfer_learning.common.errors import UserError
from transfer_learning.features.store import KEY_DTYPE, not_a_file, out_of_space, scan_features, whole_h5_file

FEATURES_DIR = Path("data/features")
DIGESTED = ("features", "labels", "views", "keys", "paths")


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
            handle.attrs.update({f"{name}_sha256": digest for name, digest in digests(handle)[0].items()})
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


def digests(handle: h5py.File) -> tuple[dict[str, str], bool]:
    """(sha256 of each dataset's bytes (paths: of their JSON list), whether the features are all finite); one
    sequential pass over the features."""
    features, finite = scan_features(handle["features"])
    found = {"features": features}
    for name in ("labels", "views", "keys"):
        found[name] = hashlib.sha256(np.ascontiguousarray(handle[name][:])).hexdigest()
    found["paths"] = hashlib.sha256(json.dumps(_paths(handle)).encode()).hexdigest()
    return found, finite


def _paths(handle: h5py.File) -> list[str]:
    return [p.decode() if isinstance(p, bytes) else p for p in handle["paths"][:]]


def damaged(path: Path, what: str) -> UserError:
    return UserError(f"{path} {what}: restore it with `dvc checkout data/features` or rebuild it with "
                     "`dvc repro extract` (it recomputes nothing: the rows are in the feature store)")


def _checked(path: Path) -> h5py.File:
    """`path` open for reading once every dataset matches the sha256 recorded when it was written and the
    features are finite; a UserError naming the file otherwise (damaged, truncated, or written before these
    digests existed). An OSError with an errno (a disk read error) is raised as it is: the file may be fine."""
    if not path.is_file():  # follows a link (DVC may check outputs out as links), but not one that loops
        if os.path.lexists(path):
            raise damaged(path, f"is {not_a_file(path)}, not a split file")
        raise UserError(f"{path} not found: run `dvc repro extract` first")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        if error.errno not in (None, errno.EINVAL):
            raise
        raise damaged(path, f"cannot be opened as HDF5 (truncated or damaged: {error})") from None
    try:
        recorded = {name: handle.attrs.get(f"{name}_sha256") for name in DIGESTED}
        if any(value is None for value in recorded.values()):
            raise UserError(f"{path} was written by an older extract, without the sha256 digests every read now "
                            "checks: run `dvc repro extract -f` (it recomputes nothing: the rows are in the "
                            "feature store)")
        actual, finite = digests(handle)
    except UserError:
        handle.close()
        raise
    except Exception as error:  # h5py reports a damaged file as OSError, KeyError, ValueError, ...
        handle.close()
        if isinstance(error, OSError) and error.errno not in (None, errno.EINVAL):
            raise
        raise damaged(path, f"cannot be read (truncated or damaged: {type(error).__name__}: {error})") from None
    wrong = [name for name in DIGESTED if actual[name] != str(recorded[name])]
    if wrong or not finite:
        handle.close()
        raise damaged(path, f"does not match the sha256 recorded when it was written ({', '.join(wrong)})"
                      if wrong else "holds values that are not finite")
    return handle


def read_split(split: str, directory: Path = FEATURES_DIR) -> SplitFeatures:
    path = directory / f"{split}.h5"
    with _checked(path) as handle:
        return SplitFeatures(
            features=handle["features"][:].astype(np.float32, copy=False),
            labels=handle["labels"][:],
            views=handle["views"][:],
            paths=_paths(handle),
            classes=[str(c) for c in handle.attrs["classes"]],
            fingerprint=str(handle.attrs["fingerprint"]),
        )


def read_labels(split: str, directory: Path = FEATURES_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(labels, views) of a split."""
    with _checked(directory / f"{split}.h5") as handle:
        return handle["labels"][:], handle["views"][:]


def read_plain_keys(split: str, directory: Path = FEATURES_DIR) -> list[str]:
    """The store keys of a split's view-0 rows, in the order of `read_split(split).plain()`."""
    with _checked(directory / f"{split}.h5") as handle:
        keep = handle["views"][:] == 0
        return [k.decode() for k in handle["keys"][:][keep]]
