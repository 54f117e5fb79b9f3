"""What this project refers to in the feature store, for `python -m stages.store gc`: the store folders, fine-tune
runs and quantized models named by the workspace, the last --commits commits of all branches, tags and remotes,
and every DVC experiment (refs/exps).

Each revision is read from git (dvc.lock and the metrics files below; no checkout), and the fingerprint its
data/features stands for from DVC's cache or, failing that, from its metrics/extract.json:
  - dvc.lock: the md5 of data/features -> its listing in DVC's cache -> each split file's `fingerprint` attr;
  - metrics/extract.json: `fingerprint` (the features' folder), `quantized_model` (`<digest>.onnx`);
  - metrics/finetune.json: `prefix_fingerprint` (the frozen prefix's rows), `run_fingerprint` (its checkpoints);
  - metrics/layers.json: `block_fingerprints` (each swept block's rows) and `adopted` (the `backbone.cut: N`
    folders the sweep copied its best block's rows into).

Read strictly, since gc deletes what nobody refers to: anything it should read and cannot is a problem, named with
the revision and the cause (git refusing the checkout or missing from PATH, an object missing from git, a metrics
file or dvc.lock that does not parse, an object of DVC's cache that cannot be read, a split file that is not a
regular file (opening a FIFO would block), a data/features whose fingerprint neither DVC's cache nor
metrics/extract.json gives, a sweep whose metrics do not name its blocks' folders). A file a revision does not
have is no problem: that revision refers to nothing through it.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import yaml

from transfer_learning.features.split_files import FEATURES_DIR
from transfer_learning.features.store import not_a_file

LOCK = "dvc.lock"
EXTRACT_METRICS = "metrics/extract.json"
FINETUNE_METRICS = "metrics/finetune.json"
LAYERS_METRICS = "metrics/layers.json"
READ = (LOCK, EXTRACT_METRICS, FINETUNE_METRICS, LAYERS_METRICS)
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML was built with it


class Unreadable(Exception):
    """Something gc should read and cannot; the message names it and why."""


@dataclass
class References:
    """{name: where it is referred to first} for store folders (fingerprints), fine-tune runs and quantized models
    (`<digest>.onnx`), and what could not be read (each naming the revision and the cause)."""
    fingerprints: dict[str, str] = field(default_factory=dict)
    runs: dict[str, str] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


# git ---------------------------------------------------------------------------------------------------------

def git(*args: str, stdin: bytes | None = None) -> bytes:
    """git's output, run in the project; any failure is Unreadable in git's own words."""
    try:
        result = subprocess.run(["git", *args], input=stdin, capture_output=True)
    except FileNotFoundError:
        raise Unreadable("git is not on PATH, so the commits and experiments that refer to store folders cannot "
                         "be read") from None
    if result.returncode != 0:
        said = [line for line in result.stderr.decode(errors="replace").splitlines() if line.strip()]
        raise Unreadable(f"`git {args[0]}` failed (exit status {result.returncode}): "
                         f"{said[0].strip() if said else 'no message'}")
    return result.stdout


def revisions(commits: int) -> list[tuple[str, str]]:
    """(label, commit): the last `commits` commits of all branches, tags and remotes, then every DVC experiment."""
    found = [(f"commit {sha[:8]}", sha) for sha in git(
        "rev-list", f"--max-count={commits}", "--exclude=refs/exps/*", "--all").decode().split()] if commits else []
    for line in git("for-each-ref", "--format=%(objectname) %(objecttype) %(refname)", "refs/exps").decode() \
            .splitlines():
        sha, kind, ref = line.split(" ", 2)
        if kind == "commit":
            found.append((f"experiment {ref.rsplit('/', 1)[-1]} ({sha[:8]})", sha))
    return found


def listed(revision: str) -> dict[str, str]:
    """{path: blob id} of the READ files `revision` has (paths relative to the project, as gc runs in it)."""
    found = {}
    for entry in git("ls-tree", "-z", revision, "--", *READ).decode().split("\0"):
        if entry:
            meta, path = entry.split("\t", 1)
            mode, kind, oid = meta.split()
            if kind == "blob":
                found[path] = oid
    return found


def blobs(oids: set[str]) -> dict[str, bytes]:
    """The bytes of every blob in `oids` git has, one `git cat-file --batch` for all (a blob a tree names but git
    lacks is left out: the revision naming it cannot be read)."""
    if not oids:
        return {}
    out = git("cat-file", "--batch", stdin="".join(f"{oid}\n" for oid in sorted(oids)).encode())
    found, at = {}, 0
    while at < len(out):
        end = out.index(b"\n", at)
        header = out[at:end].decode().split()
        at = end + 1
        if len(header) == 3:  # "<oid> blob <size>", then the bytes and a newline; else "<oid> missing"
            size = int(header[2])
            found[header[0]] = out[at:at + size]
            at += size + 1
    return found


# DVC's cache -------------------------------------------------------------------------------------------------

class DvcCache:
    """Split files of data/features in DVC's cache, by md5 (DVC's own cache layout, both of its versions)."""

    def __init__(self, repo=None):
        self.repo = repo  # None: no DVC project here (or it cannot be opened), so nothing is in its cache
        self.known: dict[str, set[str] | None] = {}

    @classmethod
    def opened(cls) -> DvcCache:
        from dvc.exceptions import NotDvcRepoError
        from dvc.repo import Repo

        try:
            return cls(Repo())
        except NotDvcRepoError:
            return cls()
        except Exception as error:  # DVC raises many kinds; each one means its cache cannot be consulted
            raise Unreadable(f"DVC cannot open this project ({type(error).__name__}: {error}), so its cache "
                             "cannot be read") from error

    def path(self, md5: str) -> Path | None:
        for odb in (self.repo.cache.local, self.repo.cache.legacy) if self.repo else ():
            path = Path(odb.oid_to_path(md5))
            if path.exists() or path.is_symlink():
                return path
        return None

    def fingerprints(self, dir_md5: str) -> set[str] | None:
        """The fingerprints of data/features with this md5; None when the cache does not hold all its files
        (not fetched, or garbage-collected); Unreadable when it holds one that cannot be read."""
        if dir_md5 not in self.known:
            self.known[dir_md5] = self.read(dir_md5)
        return self.known[dir_md5]

    def read(self, dir_md5: str) -> set[str] | None:
        listing = self.path(dir_md5)
        if listing is None:
            return None
        try:
            entries = json.loads(listing.read_text())
            split_files = [(entry["relpath"], entry["md5"]) for entry in entries if entry["relpath"].endswith(".h5")]
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise Unreadable(f"DVC's cache: {listing}, the listing of {FEATURES_DIR} (md5 {dir_md5}), cannot be "
                             f"read: {error}") from error
        found = set()
        for relpath, md5 in split_files:
            cached = self.path(md5)
            if cached is None:
                return None
            found.add(split_fingerprint(cached, f"DVC's cache: {cached} ({FEATURES_DIR}/{relpath} of md5 {dir_md5})"))
        return found

    def close(self) -> None:
        if self.repo:
            self.repo.close()


def split_fingerprint(path: Path, what: str) -> str:
    # follows a link (DVC may check outputs out as links); anything else but a regular file is a problem, not
    # opened: h5py's open of a FIFO blocks until something writes to it, and gc would hang
    if not path.is_file():
        kind = not_a_file(path) if os.path.lexists(path) else "missing"
        raise Unreadable(f"{what} is {kind}, not a split file")
    try:
        with h5py.File(path, "r") as handle:
            return str(handle.attrs["fingerprint"])
    except Exception as error:  # a damaged file can make h5py raise almost anything
        raise Unreadable(f"{what} cannot be read: {type(error).__name__}: {error}") from error


# one revision ------------------------------------------------------------------------------------------------

def parsed_json(files: dict[str, bytes], path: str) -> dict:
    if path not in files:
        return {}
    try:
        value = json.loads(files[path])
    except ValueError as error:
        raise Unreadable(f"{path} is not JSON ({error})") from error
    if not isinstance(value, dict):
        raise Unreadable(f"{path} holds {type(value).__name__}, not a JSON object")
    return value


def named(metrics: dict, path: str, key: str) -> str | None:
    value = metrics.get(key)
    if value is not None and not isinstance(value, str):
        raise Unreadable(f"{path}: `{key}` is {value!r}, not a name of the store's")
    return value


def features_md5s(files: dict[str, bytes]) -> frozenset[str]:
    return lock_md5s(files[LOCK]) if LOCK in files else frozenset()


@functools.lru_cache(maxsize=64)
def lock_md5s(lock: bytes) -> frozenset[str]:
    """The md5s data/features has in a dvc.lock (as any stage's out or dep). Parsed once per distinct file: most
    commits share one, and parsing takes a good part of a second in pure-Python YAML."""
    try:
        stages = (yaml.load(lock, Loader=YAML_LOADER) or {}).get("stages", {})
        return frozenset(entry["md5"] for stage in stages.values()
                         for entry in stage.get("outs", []) + stage.get("deps", [])
                         if entry.get("path") == FEATURES_DIR.as_posix() and entry.get("md5"))
    except (yaml.YAMLError, AttributeError, TypeError) as error:
        raise Unreadable(f"{LOCK} does not parse as DVC writes it ({type(error).__name__}: {error})") from error


def sweep_fingerprints(layers: dict) -> dict[str, str]:
    """{fingerprint: what it is} of a layer sweep's metrics: each block's rows and the adopted cuts' folders."""
    if not layers.get("enabled"):
        return {}
    blocks = layers.get("block_fingerprints")
    if not isinstance(blocks, dict) or not all(isinstance(v, str) for v in blocks.values()):
        raise Unreadable(f"{LAYERS_METRICS} records a layer sweep but not the store folders of its blocks' rows "
                         "(`block_fingerprints`, written by sweeps since gc reads them): run the sweep again (it "
                         "reuses every stored row), or leave an old commit out with --commits, an old experiment "
                         "with `dvc exp remove`")
    found = {fingerprint: f"layer sweep block {block}" for block, fingerprint in blocks.items()}
    adopted = layers.get("adopted") or {}
    if not isinstance(adopted, dict):
        raise Unreadable(f"{LAYERS_METRICS}: `adopted` is {adopted!r}, not a record per block")
    for block, record in adopted.items():
        if fingerprint := named(record if isinstance(record, dict) else {}, LAYERS_METRICS, "fingerprint"):
            found.setdefault(fingerprint, f"layer sweep, block {block} adopted for `backbone.cut: {block}`")
    return found


def refer(found: References, label: str, files: dict[str, bytes], cache: DvcCache) -> None:
    """Adds what one revision (its READ files' bytes) refers to; Unreadable if any of it cannot be read."""
    extract = parsed_json(files, EXTRACT_METRICS)
    finetune = parsed_json(files, FINETUNE_METRICS)
    sweep = sweep_fingerprints(parsed_json(files, LAYERS_METRICS))
    fingerprint = named(extract, EXTRACT_METRICS, "fingerprint")
    fingerprints = {fingerprint: label} if fingerprint else {}
    for md5 in sorted(features_md5s(files)):
        cached = cache.fingerprints(md5)
        if cached is None and fingerprint is None:
            raise Unreadable(f"{FEATURES_DIR} (md5 {md5} in {LOCK}) is not wholly in DVC's cache and "
                             f"{EXTRACT_METRICS} names no fingerprint, so the store folder it uses is unknown "
                             "(`dvc fetch` brings the files back)")
        fingerprints |= {f: label for f in sorted(cached or ()) if f not in fingerprints}
    if prefix := named(finetune, FINETUNE_METRICS, "prefix_fingerprint"):
        fingerprints.setdefault(prefix, f"{label} (fine-tune frozen prefix)")
    for swept, what in sweep.items():
        fingerprints.setdefault(swept, f"{label} ({what})")
    for name, where in fingerprints.items():
        found.fingerprints.setdefault(name, where)
    if model := named(extract, EXTRACT_METRICS, "quantized_model"):
        found.models.setdefault(model, label)
    if run := named(finetune, FINETUNE_METRICS, "run_fingerprint"):
        found.runs.setdefault(run, label)


def workspace_files() -> dict[str, bytes]:
    found = {}
    for path in READ:
        try:
            if Path(path).is_file():
                found[path] = Path(path).read_bytes()
        except OSError as error:
            raise Unreadable(f"{path} cannot be read: {error}") from error
    return found


def referenced(commits: int) -> References:
    """What the workspace, the last `commits` commits and every experiment refer to, and what could not be read."""
    found = References()
    try:
        cache = DvcCache.opened()
    except Unreadable as error:
        found.problems.append(str(error))
        cache = DvcCache()
    try:
        for split_file in sorted(FEATURES_DIR.glob("*.h5")):
            try:
                found.fingerprints.setdefault(split_fingerprint(split_file, str(split_file)),
                                              f"workspace {split_file}")
            except Unreadable as error:
                found.problems.append(f"workspace: {error}")
        try:
            refer(found, "workspace", workspace_files(), cache)
        except Unreadable as error:
            found.problems.append(f"workspace: {error}")
        try:
            history = revisions(commits)
            listings = {sha: listed(sha) for _, sha in history}
            contents = blobs({oid for listing in listings.values() for oid in listing.values()})
        except Unreadable as error:
            found.problems.append(f"git cannot read this checkout's history: {error}")
            history = []
        for label, sha in history:
            try:
                missing = sorted(path for path, oid in listings[sha].items() if oid not in contents)
                if missing:
                    raise Unreadable(f"git lacks the object of {', '.join(missing)} (a damaged or partial clone)")
                refer(found, label, {path: contents[oid] for path, oid in listings[sha].items()}, cache)
            except Unreadable as error:
                found.problems.append(f"{label}: {error}")
    finally:
        cache.close()
    return found
