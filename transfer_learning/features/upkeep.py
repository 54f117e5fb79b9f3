"""Upkeep of the feature store (extract.store, or --store), behind `python -m stages.store list | verify | gc`.

  list            every fingerprint folder: rows, MB, files, rejected files, last use, and what the fingerprint
                  stands for (backbone, cut, pooling, precision, dtype, input size); every fine-tune folder (a
                  run's checkpoints, or the kept frozen-prefix export) named for what it is
  verify          every file checked as a run checks it (digests, finite features); a bad one is moved aside
                  (its rows are recomputed by the next run) and named; exit status 1 if any
  gc [--dry-run]  deletes what this repo does not refer to and nothing used for --days days (the rule below);
                  deletes nothing when it cannot read what the repo refers to

Only the store's own folders are touched: `<fingerprint>/` (a 64-hex name with its `<fingerprint>.lock` beside it),
`finetune/<run fingerprint>/` and the int8/fp16 models `quantized/<digest>.onnx` (features/quantize.py). Anything
else in the store folder is named once ("not a store folder, left alone") and never read, moved or deleted by any
of the three commands.

gc first reads what the project refers to (features/references.py): the workspace, the last --commits commits of
all branches, tags and remotes, and every DVC experiment. If any of that cannot be read (git refuses the checkout
or is not on PATH, an object is missing, a metrics file does not parse, DVC's cache holds a file it cannot read, a
revision's data/features has no known fingerprint), gc deletes nothing: it names each cause and stops (exit status
2). `--force` goes on with what could be read and is dangerous: a folder only an unread revision refers to is then
deleted unless used within --days.

gc keeps a fingerprint folder when any of these holds, and deletes it otherwise:
  - one of those revisions refers to it: its data/features (`fingerprint` attr, via dvc.lock and DVC's cache),
    metrics/extract.json's `fingerprint`, metrics/finetune.json's `prefix_fingerprint` (the fine-tune's cached
    prefix outputs), metrics/layers.json's `block_fingerprints` (the layer sweep's rows per block) and `adopted`
    (the `backbone.cut: N` folders the sweep filled);
  - it was used in the last --days days (each run that opens it sets the folder's mtime). This keeps an experiment
    that is running or not yet committed;
  - a run holds its lock.
`finetune/<run>` folders (checkpoints) are kept when metrics/finetune.json's `run_fingerprint` in one of those
revisions names them, or when one of their files changed in the last --days days; the fine-tune's kept
frozen-prefix export (`finetune/<recipe digest>/prefix.onnx`, seconds to export again) only by --days. A
`quantized/<digest>.onnx` model (with its .sha256 and .lock) is kept when metrics/extract.json's `quantized_model`
in one of those revisions names it, when it was used in the last --days days (each reuse sets its mtime) or while
a run holds its lock.
`*.rejected-*` files (moved aside by a check) are deleted once rejected more than --days days ago.
`--days 0` applies all of it now.
"""
from __future__ import annotations

import os
import shutil
import time
from datetime import datetime
from pathlib import Path

import h5py
from filelock import FileLock, Timeout

from transfer_learning.common.errors import UserError
from transfer_learning.features.fingerprint import ABOUT, read_about
from transfer_learning.features.references import referenced
from transfer_learning.features.store import FINGERPRINT_PATTERN, FeatureStore, not_a_file

FINETUNE = "finetune"
QUANTIZED = "quantized"  # features/quantize.py's QUANTIZED_DIR (not imported: that module imports onnxruntime)
MODEL_COMPANIONS = (".sha256", ".lock")  # written beside each quantized model
PREFIX_EXPORT = "prefix.onnx"  # finetune/prefix.py keeps its export as finetune/<recipe digest>/prefix.onnx
DAY = 86400.0


# what is in the store ----------------------------------------------------------------------------------------

def store_folders(store: Path) -> tuple[list[Path], list[Path]]:
    """(fingerprint folders, fine-tune run folders): only what the store itself makes. Every other entry is named
    once here and left alone (extract.store may point at a folder that holds other things)."""
    folders, runs, foreign = [], [], []
    for entry in sorted(store.iterdir()):
        if entry.name == QUANTIZED and entry.is_dir() and not entry.is_symlink():
            foreign += [f for f in sorted(entry.iterdir()) if model_of(f) is None]
        elif entry.name == FINETUNE and entry.is_dir() and not entry.is_symlink():
            for run in sorted(entry.iterdir()):
                (runs if run.is_dir() and not run.is_symlink() and FINGERPRINT_PATTERN.fullmatch(run.name)
                 else foreign).append(run)
        elif FINGERPRINT_PATTERN.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            (folders if entry.with_name(entry.name + ".lock").is_file() else foreign).append(entry)
        elif not (entry.suffix == ".lock" and FINGERPRINT_PATTERN.fullmatch(entry.stem)):
            foreign.append(entry)
    for entry in foreign:
        print(f"note: {entry}: not a store folder, left alone")
    return folders, runs


def model_of(path: Path) -> str | None:
    """The quantized model (`<digest>.onnx`) a file in `quantized/` belongs to: itself, its .sha256 or .lock, or
    a copy of it moved aside (`.rejected-<ns>`); None for a file quantize.py does not write."""
    name = path.name.split(".rejected-")[0]
    for companion in MODEL_COMPANIONS:
        name = name.removesuffix(companion)
    stem, dot, suffix = name.partition(".")
    return name if suffix == "onnx" and FINGERPRINT_PATTERN.fullmatch(stem) and not path.is_symlink() else None


def quantized_models(store: Path) -> tuple[list[Path], list[Path]]:
    """(the models in `<store>/quantized/`, the copies of them moved aside there)."""
    folder = store / QUANTIZED
    files = sorted(f for f in folder.iterdir() if model_of(f)) if folder.is_dir() and not folder.is_symlink() else []
    return ([f for f in files if f.name == model_of(f) and f.is_file()],
            [f for f in files if ".rejected-" in f.name and f.is_file()])


def finetune_kind(folder: Path) -> str:
    """What a `finetune/<64-hex>/` folder holds: a run's checkpoints, or the frozen prefix's export kept by its
    recipe's digest (finetune/prefix.py: prefix.onnx with its record prefix.json)."""
    if (folder / PREFIX_EXPORT).exists() or (folder / PREFIX_EXPORT).with_suffix(".json").exists():
        return "fine-tune frozen-prefix export: kept to spare seconds of exporting; gc keeps it by --days only"
    return "fine-tune run: its checkpoints, kept while metrics/finetune.json names the run (or by --days)"


def size_of(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def last_change(folder: Path) -> float:
    return max([folder.stat().st_mtime] + [f.stat().st_mtime for f in folder.rglob("*")])


def rows_in(folder: Path) -> int:
    """Rows as the files' attrs say (one file after a compacted run); unreadable or damaged files count none
    (`verify` says what is wrong with them)."""
    rows = 0
    for path in folder.glob("*.h5"):
        if not_a_file(path):  # a FIFO would block the open; `verify` names and moves aside what is not a file
            continue
        try:
            with h5py.File(path, "r") as handle:
                rows += int(handle.attrs.get("rows", 0))
        except Exception:  # a damaged file can make h5py raise almost anything; listing is no place to stop
            pass
    return rows


def rejected_at(path: Path) -> float:
    """When a file was moved aside: the ns time in its `.rejected-<ns>` suffix (renaming keeps the old mtime)."""
    try:
        return int(path.suffix.removeprefix(".rejected-")) / 1e9
    except ValueError:
        return path.stat().st_mtime


def when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")


def days_ago(seconds: float) -> str:
    return f"{(time.time() - seconds) / DAY:.1f} days ago"


def description(folder: Path) -> str:
    """What a fingerprint folder's rows are, in words, from the ABOUT a run wrote beside them; shown only when the
    spec in it hashes to the folder's name."""
    described = read_about(folder)
    if described is None:
        return (f"({ABOUT} does not describe this fingerprint: not shown)" if (folder / ABOUT).exists() else
                "(no description: written before the store described its folders; the next run using it adds one)")
    parts = [f"{described.get('arch')} {described.get('weights') or 'random init'}"]
    if "block" in described:
        parts.append(f"block {described['block']} ({described.get('block_name')}, node {described.get('node')})")
    elif described.get("cut") is not None:
        parts.append(f"cut {described['cut']} (node {described.get('cut_node')})")
    for key, label in (("pool", "pool "), ("feature_dim", "features: ")):
        if described.get(key) is not None:
            parts.append(f"{label}{described[key]}")
    parts += [f"{described.get('precision')} {described.get('dtype')}"]
    size = described.get("input") or {}
    if size:
        parts.append(f"input {size.get('crop')} px of {size.get('resize')} ({size.get('interpolation')}, "
                     f"bit depth {size.get('bit_depth')})")
    return f"{described.get('rows')}: " + ", ".join(parts)


def list_store(store: Path) -> int:
    folders, runs = store_folders(store)
    print(f"{'fingerprint':<64}  {'rows':>8}  {'MB':>9}  {'files':>5}  {'rejected':>8}  last used")
    total = 0
    for folder in folders:
        size = size_of(folder)
        total += size
        print(f"{folder.name:<64}  {rows_in(folder):>8}  {size / 1e6:>9.1f}  {len(list(folder.glob('*.h5'))):>5}  "
              f"{len(list(folder.glob('*.rejected-*'))):>8}  {when(folder.stat().st_mtime)}")
        print(f"  = {description(folder)}")
    for run in runs:
        size = size_of(run)
        total += size
        name = f"{FINETUNE}/{run.name}"
        print(f"{name:<64}  {'-':>8}  {size / 1e6:>9.1f}  {sum(1 for f in run.rglob('*') if f.is_file()):>5}  "
              f"{'-':>8}  {when(last_change(run))}")
        print(f"  = {finetune_kind(run)}")
    models, rejected = quantized_models(store)
    for model in models:
        size = model.stat().st_size
        total += size
        name = f"{QUANTIZED}/{model.name}"
        aside = sum(1 for f in rejected if model_of(f) == model.name)
        print(f"{name:<64}  {'-':>8}  {size / 1e6:>9.1f}  {1:>5}  {aside:>8}  {when(model.stat().st_mtime)}")
    print(f"{store}: {total / 1e6:.1f} MB")
    return 0


def verify(store: Path) -> int:
    started = time.perf_counter()
    files = bad = size = 0
    for folder in store_folders(store)[0]:
        files += len(list(folder.glob("*.h5")))
        size += sum(f.lstat().st_size for f in folder.glob("*.h5"))  # lstat: a looping link is named, not followed
        last_used = folder.stat().st_mtime
        with FeatureStore.existing(folder) as checked:
            for name, problem in checked.rejected.items():
                print(f"BAD      {folder / name}: {problem}; moved aside, the next run recomputes its rows")
            for name, problem in checked.undecided.items():
                print(f"UNSURE   {folder / name}: {problem}")
            bad += len(checked.rejected) + len(checked.undecided)
            print(f"ok       {folder.name}: {len(checked)} rows in {len(checked.files)} file(s)")
        os.utime(folder, (last_used, last_used))  # checking is not using: gc goes by the last run's use
    print(f"verified {files} file(s), {size / 1e6:.1f} MB, in {time.perf_counter() - started:.2f} s: {bad} bad")
    return 1 if bad else 0


# gc ----------------------------------------------------------------------------------------------------------

def gc(store: Path, days: float, commits: int, dry_run: bool, force: bool = False) -> int:
    if not Path("dvc.yaml").is_file():
        raise UserError("run gc from the project's root (where dvc.yaml is): it keeps what this repo refers to")
    found = referenced(commits)
    if found.problems and not force:
        raise UserError(
            "gc stopped and deleted nothing: it cannot tell what this project refers to in the store, because\n"
            + "".join(f"  - {problem}\n" for problem in found.problems)
            + "Fix that and run gc again. (--force deletes by what could be read: the store folders the revisions "
              "above use would be lost unless used within --days.)")
    for problem in found.problems:
        print(f"warning: --force: going on although {problem}; what that refers to is protected only by --days")
    referenced_folders, referenced_runs, referenced_models = found.fingerprints, found.runs, found.models
    if not store.resolve().is_relative_to(Path.cwd().resolve()):
        print(f"note: {store} lies outside this project: other projects using it are not asked what they refer "
              f"to; only --days ({days:g}) protects their fingerprints")
    folders, runs = store_folders(store)
    cutoff = time.time() - days * DAY
    verb = "would delete" if dry_run else "delete"
    freed = 0

    def delete(path: Path, why: str) -> None:
        nonlocal freed
        folder = path.is_dir() and not path.is_symlink()  # a link moved aside by a check goes, not what it names
        size = size_of(path) if folder else path.lstat().st_size
        print(f"{verb:<12}  {path}  {size / 1e6:.1f} MB: {why}")
        freed += size
        if not dry_run:
            shutil.rmtree(path) if folder else path.unlink()

    for folder in folders:
        if folder.name in referenced_folders:
            print(f"{'keep':<12}  {folder.name}: {referenced_folders[folder.name]}")
        elif folder.stat().st_mtime > cutoff:
            print(f"{'keep':<12}  {folder.name}: used {days_ago(folder.stat().st_mtime)}")
        else:
            lock = FileLock(str(folder) + ".lock", timeout=0)  # the lock FeatureStore takes; its file stays
            try:
                lock.acquire()
            except Timeout:
                print(f"{'keep':<12}  {folder.name}: in use by a running process")
                continue
            try:
                if folder.stat().st_mtime > cutoff:  # opened between the look and the lock
                    print(f"{'keep':<12}  {folder.name}: used {days_ago(folder.stat().st_mtime)}")
                else:
                    delete(folder, f"not referenced, last used {days_ago(folder.stat().st_mtime)}")
                    continue
            finally:
                lock.release()
        for rejected in sorted(folder.glob("*.rejected-*")):
            if rejected_at(rejected) <= cutoff:
                delete(rejected, f"rejected {days_ago(rejected_at(rejected))}")
    for run in runs:
        if run.name in referenced_runs:
            print(f"{'keep':<12}  {FINETUNE}/{run.name}: {referenced_runs[run.name]}")
        elif last_change(run) <= cutoff:
            delete(run, f"{finetune_kind(run).split(':')[0]} last written {days_ago(last_change(run))}")
        else:
            print(f"{'keep':<12}  {FINETUNE}/{run.name}: written {days_ago(last_change(run))}")
    models, rejected_models = quantized_models(store)
    for model in models:
        name = f"{QUANTIZED}/{model.name}"
        if model.name in referenced_models:
            print(f"{'keep':<12}  {name}: {referenced_models[model.name]}")
            continue
        lock = FileLock(str(model) + ".lock", timeout=0)  # the lock quantize.py builds and reuses it under
        try:
            lock.acquire()
        except Timeout:
            print(f"{'keep':<12}  {name}: in use by a running process")
            continue
        try:
            if model.stat().st_mtime > cutoff:
                print(f"{'keep':<12}  {name}: used {days_ago(model.stat().st_mtime)}")
            else:
                record = model.with_name(model.name + ".sha256")
                delete(model, f"not referenced, last used {days_ago(model.stat().st_mtime)}")
                if record.is_file():
                    delete(record, f"the sha256 of {model.name}")
        finally:
            lock.release()
    for rejected in rejected_models:
        if rejected_at(rejected) <= cutoff:
            delete(rejected, f"rejected {days_ago(rejected_at(rejected))}")
    print(f"{'would free' if dry_run else 'freed'} {freed / 1e6:.1f} MB in {store}")
    return 0
