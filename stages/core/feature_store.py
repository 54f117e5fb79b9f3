"""The feature store: frozen features keyed by (model fingerprint, image sha256, view), kept across runs.

Layout: `<store>/<fingerprint>/` holds HDF5 files with datasets `keys` (N,) and `features` (N×D) and attrs
`fingerprint`, `rows`, `feature_dim`. Normally that is one file (`base-*.h5`); during a run, every commit adds
a segment file, and `compact()` merges them back into one at the end.

Why segments rather than appending in place: HDF5 is not crash-safe. A process killed while HDF5 metadata is
being written can leave the whole file unreadable, and with it every row computed before. Here a file only
appears under its final name once it is complete (written as .part, fsynced, renamed), so a SIGKILL at any
point leaves whole files that the next run trusts, plus a .part that it deletes. Rows count from their commit.

One writer per fingerprint: a lock file (fcntl, so it is released even when the holder is killed). A second
process waits for it, up to `lock_timeout` seconds, then fails with a clear message.
"""
from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
from filelock import FileLock, Timeout

from stages.core.errors import UserError

log = logging.getLogger(__name__)
KEY_DTYPE = "S96"  # "<sha256 hex>/<view id>", checked in store_key: numpy would truncate silently
COMPACT_ABOVE_FILES = 8


def resolve_store(store: str) -> Path:
    """extract.store, relative to the project. `dvc exp run --temp` and queued experiments run in a copy under
    .dvc/tmp/exps/; their relative store path is taken from the real project so that they share its store."""
    path = Path(store)
    if path.is_absolute():
        return path
    parts = Path.cwd().resolve().parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i]) / path
    return path


def store_key(sha256: str, view: str) -> str:
    key = f"{sha256}/{view}"
    if len(key) > int(KEY_DTYPE[1:]):
        raise ValueError(f"store key {key!r} is longer than {KEY_DTYPE}")
    return key


class FeatureStore:
    def __init__(self, root: Path | str, fingerprint: str, feature_dim: int, dtype: str = "float32",
                 commit_rows: int = 1024, commit_seconds: float = 5.0, lock_timeout: float = 600.0):
        self.dir = Path(root) / fingerprint
        self.fingerprint = fingerprint
        self.feature_dim = feature_dim
        self.dtype = np.dtype(dtype)
        self.commit_rows = commit_rows
        self.commit_seconds = commit_seconds  # at most this much work is lost to a kill
        self.last_commit = time.monotonic()
        self.lock = FileLock(str(self.dir) + ".lock", timeout=lock_timeout)
        self.index: dict[str, tuple[Path, int]] = {}
        self.files: list[Path] = []  # every trusted file, including ones whose rows all live elsewhere too
        self.pending_keys: list[str] = []
        self.pending: list[np.ndarray] = []
        self.rejected_files: list[str] = []

    # lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> FeatureStore:
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            log.info("feature store %s is in use by another process; waiting up to %.0f s",
                     self.dir, self.lock.timeout)
            try:
                self.lock.acquire()
            except Timeout:
                raise UserError(
                    f"feature store {self.dir} stayed locked by another process for {self.lock.timeout:.0f} s "
                    f"(lock file {self.lock.lock_file}); wait for that extract to finish, then run again"
                ) from None
        try:
            self._load()
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.commit()  # rows computed before an error (or Ctrl-C) are kept
        finally:
            self.lock.release()

    def _load(self) -> None:
        for stale in self.dir.glob("*.part"):
            stale.unlink()
        for path in sorted(self.dir.glob("*.h5")):
            problem = self._check(path)
            if problem:
                aside = path.with_suffix(f".rejected-{time.time_ns()}")
                path.rename(aside)
                self.rejected_files.append(path.name)
                log.warning("feature store: %s %s; moved to %s, its rows will be recomputed",
                            path, problem, aside.name)
                continue
            self.files.append(path)
            with h5py.File(path, "r") as handle:
                for row, key in enumerate(handle["keys"][:]):
                    self.index.setdefault(key.decode(), (path, row))

    def _check(self, path: Path) -> str | None:
        """Why this file cannot be trusted, or None."""
        try:
            with h5py.File(path, "r") as handle:
                rows = int(handle.attrs.get("rows", -1))
                if handle.attrs.get("fingerprint") != self.fingerprint:
                    return f"was written for fingerprint {handle.attrs.get('fingerprint')!r}"
                if int(handle.attrs.get("feature_dim", -1)) != self.feature_dim:
                    return f"has feature_dim {handle.attrs.get('feature_dim')} instead of {self.feature_dim}"
                if handle["keys"].shape[0] != rows or handle["features"].shape != (rows, self.feature_dim):
                    return (f"says {rows} rows but holds {handle['keys'].shape[0]} keys and features of "
                            f"shape {handle['features'].shape}")
                if handle["features"].dtype != self.dtype:
                    return f"holds {handle['features'].dtype}, not {self.dtype}"
        except (OSError, KeyError) as error:
            if getattr(error, "errno", None) is not None:  # EIO, EACCES, EMFILE...: the disk, not the file
                raise
            return f"is unreadable (truncated or corrupt: {error})"
        return None

    # reading ---------------------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def gather(self, keys: list[str], chunk: int = 4096) -> Iterator[np.ndarray]:
        """Features of `keys`, in order, `chunk` rows at a time (never all in memory)."""
        handles: dict[Path, h5py.File] = {}
        try:
            for start in range(0, len(keys), chunk):
                part = keys[start:start + chunk]
                out = np.empty((len(part), self.feature_dim), dtype=self.dtype)
                by_file: dict[Path, list[tuple[int, int]]] = defaultdict(list)
                for slot, key in enumerate(part):
                    path, row = self.index[key]
                    by_file[path].append((row, slot))
                for path, pairs in by_file.items():
                    if path not in handles:
                        handles[path] = h5py.File(path, "r")
                    rows = np.array(sorted({row for row, _ in pairs}))  # h5py reads increasing indices only
                    block = handles[path]["features"][rows]
                    position = {row: i for i, row in enumerate(rows)}
                    for row, slot in pairs:
                        out[slot] = block[position[row]]
                yield out
        finally:
            for handle in handles.values():
                handle.close()

    # writing ---------------------------------------------------------------------------------------
    def add(self, keys: list[str], features: np.ndarray) -> None:
        if features.shape != (len(keys), self.feature_dim):
            raise ValueError(f"features of shape {features.shape} for {len(keys)} keys of dim {self.feature_dim}")
        self.pending_keys += keys
        self.pending.append(features.astype(self.dtype, copy=False))
        if len(self.pending_keys) >= self.commit_rows or time.monotonic() - self.last_commit > self.commit_seconds:
            self.commit()

    def commit(self) -> None:
        """Make the pending rows durable: a new complete file, or nothing."""
        self.last_commit = time.monotonic()
        if not self.pending_keys:
            return
        path = self._write(f"segment-{time.time_ns()}.h5", len(self.pending_keys),
                           [(self.pending_keys, np.concatenate(self.pending))])
        self.files.append(path)
        for row, key in enumerate(self.pending_keys):
            self.index.setdefault(key, (path, row))
        self.pending_keys, self.pending = [], []

    def compact(self, above_files: int = COMPACT_ABOVE_FILES) -> None:
        """Merge every file into one once there are more than `above_files` (so a run that adds 10 rows
        does not rewrite the whole store); the old files go only after the new one is in place."""
        files = list(self.files)
        if len(files) <= above_files:
            return
        keys = list(self.index)
        path = self._write(f"base-{time.time_ns()}.h5", len(keys), zip(
            (keys[i:i + 4096] for i in range(0, len(keys), 4096)), self.gather(keys)))
        self.index = {key: (path, row) for row, key in enumerate(keys)}
        self.files = [path]
        for old in files:
            old.unlink()
        log.info("feature store: compacted %d files into %s (%d rows)", len(files), path.name, len(keys))

    def _write(self, name: str, rows: int, parts) -> Path:
        """A complete file of `rows` rows from (keys, features) parts, or none: written as .part, fsynced,
        renamed. Contiguous layout: the size is known up front, and a row costs feature_dim x dtype bytes."""
        final = self.dir / name
        tmp = final.with_suffix(".part")
        with h5py.File(tmp, "w") as handle:
            keys = handle.create_dataset("keys", shape=(rows,), dtype=KEY_DTYPE)
            features = handle.create_dataset("features", shape=(rows, self.feature_dim), dtype=self.dtype)
            start = 0
            for part_keys, part_features in parts:
                keys[start:start + len(part_keys)] = np.array(part_keys, dtype=KEY_DTYPE)
                features[start:start + len(part_keys)] = part_features
                start += len(part_keys)
            if start != rows:
                raise RuntimeError(f"wrote {start} rows into a file of {rows}")
            handle.attrs.update(fingerprint=self.fingerprint, rows=rows, feature_dim=self.feature_dim)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        tmp.replace(final)
        return final
