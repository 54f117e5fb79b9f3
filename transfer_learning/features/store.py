"""The feature store: frozen features keyed by (model fingerprint, image sha256, view), kept across runs.

Layout: `<store>/<fingerprint>/` holds HDF5 files with datasets `keys` (N,) and `features` (N×D) and attrs
`fingerprint`, `rows`, `feature_dim`, `features_sha256`, `keys_sha256`. Normally that is one file (`base-*.h5`);
during a run, every commit adds a segment file, and `compact()` merges them back into one at the end. The
folder's mtime is its last use (set by every run that opens it), for `python -m stages.store gc`. A run that says
what its fingerprint stands for (`about`, features/fingerprint.py) leaves that beside the rows, for
`python -m stages.store list`; nothing reads it to decide what to serve.

Why segments rather than appending in place: HDF5 is not crash-safe. A process killed while HDF5 metadata is
being written can leave the whole file unreadable, and with it every row computed before. Here a file only
appears under its final name once it is complete (written as .part, fsynced, renamed), so a SIGKILL at any
point leaves whole files that the next run trusts, plus a .part that it deletes. Rows count from their commit.

Nothing is served on trust. Each file records the sha256 of its `features` and `keys` bytes in its attrs when it
is written; opening the store reads every file once, sequentially (3,000 x 1,280 float32 rows: 0.03 s, 0.05 s from
a cold page cache), checks both digests and that every feature is finite, and moves a file that fails aside
(`*.rejected-<ns>`, logged) so that its rows are recomputed. HDF5's fletcher32 would check on every read instead,
but only chunked datasets have it, and a chunk layout makes `gather`'s scattered rows cost a chunk read each. The
store never writes a non-finite row (`add` refuses it), so one found later means damage; `gather` checks the rows
it serves too, and `compact` merges a file only if the bytes it reads still hash to the digests checked on open.
Whatever a damaged file makes h5py raise (a bad attr, shape or header gives ValueError, TypeError, IndexError...)
quarantines it; only an OSError with an errno (the disk, not the file) stops the run. A file without digests
(written before files carried them) is moved aside like any other that fails its check: nothing shows that its
bytes are the ones written, and a stamp would make whatever it holds trusted from then on. Anything under a store
file's name that is not a regular file (a directory, a symbolic link, looping or not, a FIFO) is moved aside too,
before it is opened: the store writes only regular files, and opening a FIFO would block.

The width and dtype a folder's files must have are what its fingerprint stands for: the run's model, or for
`existing()` (verify, which has no model) the folder's own record, ABOUT, whose spec hashes to the folder's name.
Never a vote of the files, which a stray file of another model could win.

A commit that finds the disk full removes its .part and stops with one error naming the space it needed; it is
not retried, and the rows committed before stay. The end-of-run merge finding the disk full stops nothing: it says
so (log, `merge_skipped`) with the space it needs, and the files it would have merged keep serving every row.

One writer per fingerprint: a lock file (fcntl, so it is released even when the holder is killed). A second
process waits for it, up to `lock_timeout` seconds, then fails with a clear message.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
from filelock import FileLock, Timeout

from transfer_learning.common.atomic import atomic_write_text
from transfer_learning.common.errors import UserError
from transfer_learning.features.fingerprint import ABOUT, digest, read_about

log = logging.getLogger(__name__)
KEY_DTYPE = "S96"  # "<sha256 hex>/<view id>", checked in store_key: numpy would truncate silently
KEY_PATTERN = re.compile(r"[0-9a-f]{64}/[A-Za-z0-9_.-]+")
FINGERPRINT_PATTERN = re.compile(r"[0-9a-f]{64}")  # a sha256 hex digest: every store folder is named by one
DIGEST_ATTRS = ("features_sha256", "keys_sha256")
COMPACT_ABOVE_FILES = 8
READ_BYTES = 16 << 20  # a file is checked this much at a time
STORED_DTYPES = (np.dtype("float32"), np.dtype("float16"))  # extract.dtype's choices
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class Untrusted(Exception):
    """Why a store file cannot be served (the message completes "<file> ...")."""


def not_a_file(path: Path) -> str | None:
    """What `path` is when it is not a regular file ("a directory", ...; a symbolic link is not followed: it may
    loop); None for a regular file."""
    mode = path.lstat().st_mode
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return f"a symbolic link (to {os.readlink(path)!r})"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "a FIFO, socket or device"


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
    if not KEY_PATTERN.fullmatch(key):
        raise ValueError(f"store key {key!r} is not <sha256 hex>/<view id>")
    return key


@contextmanager
def whole_h5_file(final: Path) -> Iterator[h5py.File]:
    """A new HDF5 file that appears under `final` only once complete: written as .part, fsynced, renamed; the
    .part is removed on any failure. HDF5 writes through a Python file object: when a write fails (a full disk),
    HDF5's own file driver leaves the library in a state that crashes the process later (SIGSEGV or SIGBUS when
    the datasets are freed), while through Python the failure is an ordinary OSError."""
    tmp = final.with_suffix(".part")
    try:
        with open(tmp, "w+b") as raw:
            with h5py.File(raw, "w") as handle:
                yield handle
            raw.flush()
            os.fsync(raw.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(final)


def out_of_space(error: BaseException | None) -> bool:
    """Whether a full disk (or quota) caused `error`; h5py may report it as the context of its own error."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return True
        error = error.__cause__ or error.__context__
    return False


def scan_features(features: h5py.Dataset) -> tuple[str, bool]:
    """(sha256 of the dataset's bytes, whether every value is finite), in one sequential read."""
    digest = hashlib.sha256()
    finite = True
    step = max(1, READ_BYTES // max(1, features.shape[1] * features.dtype.itemsize))
    for start in range(0, features.shape[0], step):
        block = features[start:start + step]
        digest.update(block)
        finite = finite and bool(np.isfinite(block).all())
    return digest.hexdigest(), finite


def decode_keys(raw: np.ndarray) -> list[str]:
    keys = []
    for row, key in enumerate(raw):
        try:
            text = key.decode("ascii")
        except UnicodeDecodeError:
            raise Untrusted(f"holds a key that is not text at row {row} ({key[:80]!r})") from None
        if not KEY_PATTERN.fullmatch(text):
            raise Untrusted(f"holds a malformed key at row {row} ({text!r})")
        keys.append(text)
    return keys


class FeatureStore:
    def __init__(self, root: Path | str, fingerprint: str, feature_dim: int | None, dtype: str | None = "float32",
                 commit_rows: int = 1024, commit_seconds: float = 5.0, lock_timeout: float = 600.0,
                 about: dict | None = None):
        """feature_dim and dtype None (only `existing()` on a folder without its record): each file is held to
        its own attrs, and the files must agree among themselves (see `_settle_shape`)."""
        if about is not None:
            if digest(about["fingerprint_spec"]) != fingerprint:
                raise ValueError(f"the description given for store folder {fingerprint} is another fingerprint's")
            if about.get("feature_dim", feature_dim) != feature_dim or about["fingerprint_spec"]["dtype"] != dtype:
                raise ValueError(f"the description given for store folder {fingerprint} says feature_dim "
                                 f"{about.get('feature_dim')} and {about['fingerprint_spec']['dtype']}, not "
                                 f"{feature_dim} and {dtype}")
            about = {**about, "feature_dim": feature_dim}  # the record `existing()` checks the files against
        self.dir = Path(root) / fingerprint
        self.fingerprint = fingerprint
        self.about = about
        self.feature_dim = feature_dim
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.commit_rows = commit_rows
        self.commit_seconds = commit_seconds  # at most this much work is lost to a kill
        self.last_commit = time.monotonic()
        self.lock = FileLock(str(self.dir) + ".lock", timeout=lock_timeout)
        self.index: dict[str, tuple[Path, int]] = {}
        self.files: list[Path] = []  # every trusted file, including ones whose rows all live elsewhere too
        self.pending_keys: list[str] = []
        self.pending: list[np.ndarray] = []
        self.rejected: dict[str, str] = {}  # file name -> what was wrong with it
        self.digests: dict[Path, tuple[str, str]] = {}  # trusted file -> (features, keys) sha256 it was checked at
        self.undecided: dict[str, str] = {}  # file name -> why it is neither served nor moved aside
        self.merge_skipped: str | None = None  # why compact() left the files as they are

    @classmethod
    def existing(cls, folder: Path, **options) -> FeatureStore:
        """The store in a fingerprint folder already on disk, to check it without the model that wrote it. Its
        files must hold the feature_dim and dtype the folder's record (ABOUT, written by each run that knows the
        model) says its fingerprint stands for. A folder without one (written before records) holds each file to
        its own attrs, and its files to agreeing with each other: files that disagree are named, not judged."""
        described = read_about(folder)
        dim = described.get("feature_dim") if described else None
        if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0:
            return cls(folder.parent, folder.name, dim, described["fingerprint_spec"]["dtype"], **options)
        return cls(folder.parent, folder.name, None, None, **options)

    @property
    def rejected_files(self) -> list[str]:
        return list(self.rejected)

    # lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> FeatureStore:
        self.dir.parent.mkdir(parents=True, exist_ok=True)
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
        try:
            self.dir.mkdir(exist_ok=True)  # under the lock: `stages.store gc` deletes folders under it
        except FileExistsError:
            raise UserError(f"{self.dir} is {not_a_file(self.dir) or 'a file'}, not a folder, and the store keeps "
                            "the rows of that fingerprint there: move it away, then run again") from None
        if self.about is not None:
            text = json.dumps(self.about, indent=2, sort_keys=True) + "\n"
            path = self.dir / ABOUT
            if path.is_symlink() or path.exists() and not path.is_file():
                self._quarantine(path, f"is {not_a_file(path)}, not a file the store wrote")
            if not path.is_file() or path.read_text(errors="replace") != text:
                atomic_write_text(path, text)
        os.utime(self.dir)  # the folder's mtime says when a run last used it (`stages.store gc` keeps recent ones)
        for stale in self.dir.glob("*.part"):
            if stale.is_dir() and not stale.is_symlink():
                self._quarantine(stale, "is a directory named like an unfinished store file")
            else:
                stale.unlink()
        shapes: dict[Path, tuple[int, np.dtype]] = {}
        for path in sorted(self.dir.glob("*.h5")):
            try:
                keys, shapes[path] = self._trusted_keys(path)
            except Untrusted as problem:
                self._quarantine(path, str(problem))
                continue
            self.files.append(path)
            for row, key in enumerate(keys):
                self.index.setdefault(key, (path, row))
        if self.feature_dim is None:
            self._settle_shape(shapes)

    def _settle_shape(self, shapes: dict[Path, tuple[int, np.dtype]]) -> None:
        """A folder without its record: the (feature_dim, dtype) its trusted files hold when they all agree. When
        they do not, nothing says which is its fingerprint's, so none is served and none moved aside (a run of its
        model, which knows, moves aside the others)."""
        found = {shapes[path] for path in self.files}
        if len(found) == 1:
            self.feature_dim, self.dtype = found.pop()
            return
        if not found:
            return
        groups = "; ".join(f"{dim} x {dtype}: " + ", ".join(p.name for p in self.files if shapes[p] == (dim, dtype))
                           for dim, dtype in sorted(found, key=str))
        for path in self.files:
            others = sorted({f"{dim} x {dtype}" for dim, dtype in found - {shapes[path]}})
            self.undecided[path.name] = (
                f"holds {shapes[path][0]} x {shapes[path][1]} features per row, other files here hold "
                f"{', '.join(others)}, and no {ABOUT} says which its fingerprint stands for: left in place, not "
                "served; the next run of its model moves aside the files it did not write")
        log.warning("feature store: %s has no %s and its files disagree on the features' shape (%s): none is "
                    "served or moved aside", self.dir, ABOUT, groups)
        self.files, self.index, self.digests = [], {}, {}

    def _trusted_keys(self, path: Path) -> tuple[list[str], tuple[int, np.dtype]]:
        """(the keys in row order, (feature_dim, dtype)) of a file whose every byte checked out; raises Untrusted."""
        if kind := not_a_file(path):  # the store writes only regular files (and opening a FIFO would block)
            raise Untrusted(f"is {kind}, not a file the store wrote")
        try:
            keys, shape, actual = self._checked(path)
        except Untrusted:
            raise
        except Exception as error:  # a damaged file can make h5py raise almost anything
            if isinstance(error, OSError) and error.errno is not None:  # EIO, EACCES, EMFILE: the disk, not the file
                raise
            raise Untrusted(f"is unreadable (truncated or corrupt: {type(error).__name__}: {error})") from None
        self.digests[path] = actual
        return keys, shape

    def _checked(self, path: Path) -> tuple[list[str], tuple[int, np.dtype], tuple[str, str]]:
        """(keys, (feature_dim, dtype), digests of the bytes) of a file that passed every check; raises Untrusted,
        or whatever h5py raises for a damaged file."""
        with h5py.File(path, "r") as handle:
            attrs, keys, features = dict(handle.attrs), handle["keys"], handle["features"]  # each looked up once
            shape = self._check_layout(attrs, keys, features)
            recorded = tuple(attrs.get(name) for name in DIGEST_ATTRS)
            if None in recorded:
                raise Untrusted("carries no sha256 digests of its bytes (written before store files had them), so "
                                "nothing shows its rows are the ones computed")
            features_sha256, finite = scan_features(features)
            raw_keys = keys[:]
        actual = (features_sha256, hashlib.sha256(raw_keys).hexdigest())
        if recorded != actual:
            damaged = " and ".join(name for name, want, got in zip(("features", "keys"), recorded, actual)
                                   if want != got)
            raise Untrusted(f"fails its checksum: its {damaged} bytes differ from the sha256 recorded when it "
                            "was written")
        if not finite:
            raise Untrusted("holds non-finite features (NaN or inf), which the store never writes")
        return decode_keys(raw_keys), shape, actual

    def _check_layout(self, attrs: dict, keys: h5py.Dataset, features: h5py.Dataset) -> tuple[int, np.dtype]:
        """The file's (feature_dim, dtype) once its attrs and shapes agree with its fingerprint (or, without a
        record of it, with each other)."""
        rows = int(attrs.get("rows", -1))
        if attrs.get("fingerprint") != self.fingerprint:
            raise Untrusted(f"was written for fingerprint {attrs.get('fingerprint')!r}")
        dim = int(attrs.get("feature_dim", -1))
        want = dim if self.feature_dim is None else self.feature_dim
        if dim != want:
            raise Untrusted(f"has feature_dim {attrs.get('feature_dim')} instead of {want}, which its "
                            "fingerprint stands for")
        keys_shape, features_shape, features_dtype = keys.shape, features.shape, features.dtype
        if keys_shape != (rows,) or features_shape != (rows, want):
            raise Untrusted(f"says {rows} rows of {want} features but holds {keys_shape[0]} keys and "
                            f"features of shape {features_shape}")
        dtype = features_dtype if self.dtype is None else self.dtype
        if features_dtype != dtype or keys.dtype != KEY_DTYPE or dtype not in STORED_DTYPES:
            raise Untrusted(f"holds {features_dtype} features and {keys.dtype} keys, not "
                            f"{dtype if dtype in STORED_DTYPES else ' or '.join(map(str, STORED_DTYPES))} and "
                            f"{KEY_DTYPE}")
        return dim, dtype

    def _quarantine(self, path: Path, problem: str) -> None:
        aside = path.with_suffix(f".rejected-{time.time_ns()}")
        path.rename(aside)
        self.rejected[path.name] = problem
        self.digests.pop(path, None)
        if path in self.files:
            self.files.remove(path)
            self.index = {key: place for key, place in self.index.items() if place[0] != path}
        log.warning("feature store: %s %s; moved to %s, its rows will be recomputed", path, problem, aside.name)

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
                    if not np.isfinite(block).all():
                        handles.pop(path).close()
                        self._quarantine(path, "holds non-finite features although it checked out when the store "
                                               "was opened (it changed on disk since)")
                        raise UserError(f"feature store file {path} was damaged during this run and is moved "
                                        "aside, none of its rows served: run again to recompute them")
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
        with np.errstate(over="ignore"):  # an overflow to inf is reported below, with what to do
            features = features.astype(self.dtype, copy=False)
        bad = ~np.isfinite(features).all(axis=1)
        if bad.any():
            raise UserError(
                f"the model gave non-finite features (NaN or inf) for {int(bad.sum())} of {len(keys)} rows "
                f"(first: {keys[int(np.argmax(bad))]}); they are not stored. "
                + (f"{self.dtype} holds values up to {np.finfo(self.dtype).max:g}: try extract.dtype: float32"
                   if self.dtype.itemsize < 4 else "Check the backbone's weights"))
        self.pending_keys += keys
        self.pending.append(features)
        if len(self.pending_keys) >= self.commit_rows or time.monotonic() - self.last_commit > self.commit_seconds:
            self.commit()

    def commit(self) -> None:
        """Make the pending rows durable: a new complete file, or nothing."""
        self.last_commit = time.monotonic()
        if not self.pending_keys:
            return
        keys, features = self.pending_keys, np.concatenate(self.pending)
        self.pending_keys, self.pending = [], []  # a failed write is not tried again, not even by __exit__
        try:
            path = self._write(f"segment-{time.time_ns()}.h5", len(keys), [(keys, features)])
        except Exception as error:
            if out_of_space(error):
                raise UserError(self._no_space(len(keys))) from None
            raise
        self.files.append(path)
        for row, key in enumerate(keys):
            self.index.setdefault(key, (path, row))

    def compact(self, above_files: int = COMPACT_ABOVE_FILES) -> None:
        """Merge every file into one once there are more than `above_files` (so a run that adds 10 rows
        does not rewrite the whole store); the old files go only after the new one is in place. Each old file is
        read whole and must hash to the digests it had when trusted, or the merge stops before the new file
        appears: a change on disk since then is never given a fresh digest. A full disk leaves the files as they
        are, serving every row, and says so (`merge_skipped`, logged): the merge is for speed, not for the rows."""
        files = list(self.files)
        if len(files) <= above_files:
            return
        keys: list[str] = []
        try:
            path = self._write(f"base-{time.time_ns()}.h5", len(self.index),
                               (part for old in files for part in self._verified_rows(old, keys)))
        except Exception as error:
            if not out_of_space(error):
                raise
            self.merge_skipped = self._merge_no_space(len(files))
            log.warning("%s", self.merge_skipped)
            return
        self.index = {key: (path, row) for row, key in enumerate(keys)}
        self.files = [path]
        for old in files:
            old.unlink()
            self.digests.pop(old, None)
        log.info("feature store: compacted %d files into %s (%d rows)", len(files), path.name, len(keys))

    def _verified_rows(self, path: Path, served: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(keys, features) of the rows the index serves from `path`, in one sequential read of the file whose
        bytes must hash to its trusted digests; appends the keys to `served`. Raises UserError (and quarantines
        the file) if they do not, after the last block: the caller's write is then abandoned."""
        want_features, want_keys = self.digests[path]
        digest = hashlib.sha256()
        with h5py.File(path, "r") as handle:
            raw_keys = handle["keys"][:]
            if hashlib.sha256(raw_keys).hexdigest() != want_keys:
                self._changed_since_open(path, "keys")
            keys = [key.decode("ascii") for key in raw_keys]
            features = handle["features"]
            step = max(1, READ_BYTES // max(1, self.feature_dim * self.dtype.itemsize))
            for start in range(0, len(keys), step):
                block = features[start:start + step]
                digest.update(block)
                chosen = [row for row in range(start, start + len(block)) if self.index.get(keys[row]) == (path, row)]
                served += [keys[row] for row in chosen]
                yield raw_keys[chosen], block[[row - start for row in chosen]]
        if digest.hexdigest() != want_features:
            self._changed_since_open(path, "features")

    def _changed_since_open(self, path: Path, what: str) -> None:
        self._quarantine(path, f"changed on disk since it was checked (its {what} bytes no longer match their "
                               "sha256)")
        raise UserError(f"feature store file {path} was damaged during this run and is moved aside, none of its rows "
                        "kept: run again to recompute them")

    def _write(self, name: str, rows: int, parts) -> Path:
        """A complete file of `rows` rows from (keys, features) parts, with their digests, or none (see
        `whole_h5_file`). Contiguous layout: the size is known up front, and a row costs feature_dim x dtype bytes."""
        final = self.dir / name
        digests = {name: hashlib.sha256() for name in DIGEST_ATTRS}
        with whole_h5_file(final) as handle:
            keys = handle.create_dataset("keys", shape=(rows,), dtype=KEY_DTYPE)
            features = handle.create_dataset("features", shape=(rows, self.feature_dim), dtype=self.dtype)
            start = 0
            for part_keys, part_features in parts:
                part_keys = np.asarray(part_keys, dtype=KEY_DTYPE)
                part_features = np.ascontiguousarray(part_features, dtype=self.dtype)
                keys[start:start + len(part_keys)] = part_keys
                features[start:start + len(part_keys)] = part_features
                digests["keys_sha256"].update(part_keys)
                digests["features_sha256"].update(part_features)
                start += len(part_keys)
            if start != rows:
                raise RuntimeError(f"wrote {start} rows into a file of {rows}")
            handle.attrs.update(fingerprint=self.fingerprint, rows=rows, feature_dim=self.feature_dim,
                                **{name: digest.hexdigest() for name, digest in digests.items()})
        self.digests[final] = tuple(digests[name].hexdigest() for name in DIGEST_ATTRS)
        return final

    def _space(self, rows: int) -> str:
        """What `rows` rows need on disk and what the store's disk has free, in words."""
        return (f"{rows * self.feature_dim * self.dtype.itemsize / 1e6:.1f} MB ({rows} rows x {self.feature_dim} x "
                f"{self.dtype.itemsize} bytes), {shutil.disk_usage(self.dir).free / 1e6:.1f} MB are free")

    def _no_space(self, rows: int) -> str:
        return (f"no space left on the disk of the feature store {self.dir}: writing {rows} rows needs "
                f"{self._space(rows)}. The {len(self.index)} rows committed before are kept: free some space "
                "(`python -m stages.store gc` deletes the store folders nothing refers to) or point extract.store to a "
                "larger disk, then run again")

    def _merge_no_space(self, files: int) -> str:
        return (f"feature store {self.dir}: no space left on its disk to merge its {files} files into one at the end "
                f"of the run: the merged copy needs {self._space(len(self.index))}. Not merged: the {files} files "
                f"serve all {len(self.index)} rows as they are; the merge is tried again at the end of the next run")
