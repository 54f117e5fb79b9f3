"""The prepared dataset: manifest.csv (path,label,split,sha256), classes.json, rejected.csv (path,kind,reason: every
file of the source that is not in the manifest) and decoding.json (the data's rule for high-bit images,
data.bit_depth, which every stage decodes by)."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transfer_learning.common.atomic import atomic_write, atomic_write_text
from transfer_learning.common.errors import UserError

if TYPE_CHECKING:
    from transfer_learning.data.decode import BitDepth

PREPARED = Path("data/prepared")
MANIFEST = PREPARED / "manifest.csv"
CLASSES = PREPARED / "classes.json"
REJECTED = PREPARED / "rejected.csv"
DECODING = PREPARED / "decoding.json"
COLUMNS = ("path", "label", "split", "sha256")
REJECTED_COLUMNS = ("path", "kind", "reason")
SPLITS = ("train", "val", "test")
# rejected.csv's kind: one word per way a file fails to become a row, which metrics/prepare.json counts by
REJECTION_KINDS = ("extension", "outside_class_folder", "link", "name_not_utf8", "unreadable", "undecodable",
                   "too_small", "duplicate", "excluded")


@dataclass(frozen=True)
class Row:
    path: str
    label: str
    split: str
    sha256: str


@dataclass(frozen=True)
class Rejection:
    path: str
    kind: str  # one of REJECTION_KINDS
    reason: str  # for a person: what is wrong and, where it helps, what to do


def printable(text: str) -> str:
    """A name as UTF-8 text: the bytes of a non-UTF-8 file name (surrogate-escaped by Python) as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def display_path(path: Path, follow_links: bool = True) -> str:
    """Relative to the project when inside it (portable manifests), absolute otherwise; with follow_links=False a
    symbolic link is named itself, not its target (which may not exist, or loop)."""
    resolved = path.resolve() if follow_links else path.parent.resolve() / path.name
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()


def stratified_splits(labels: list[str], val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """train/val/test per item, stratified by label, seeded."""
    from sklearn.model_selection import train_test_split  # imported here: the stages reading manifests skip it
    index = np.arange(len(labels))
    splits = np.array(["train"] * len(labels), dtype=object)
    y = np.array(labels)
    try:
        if test_fraction > 0:
            rest, test = train_test_split(index, test_size=test_fraction, stratify=y, random_state=seed)
            splits[test] = "test"
        else:
            rest = index
        if val_fraction > 0:
            _, val = train_test_split(
                rest, test_size=val_fraction / (1 - test_fraction), stratify=y[rest], random_state=seed
            )
            splits[val] = "val"
    except ValueError as error:
        counts = dict(zip(*np.unique(y, return_counts=True)))
        raise UserError(
            f"data.val_fraction/test_fraction: cannot split stratified ({error}); images per class: "
            f"{ {str(k): int(v) for k, v in counts.items()} }. Add images or lower the fractions."
        ) from None
    return list(splits)


def write(rows: list[Row], classes: list[str], rejected: list[Rejection], bit_depth: BitDepth) -> None:
    """Each file atomically, manifest.csv last: a crash leaves the previous file or the new one, never a cut-off
    one. Rejected paths may be non-UTF-8 names: they are written printable."""
    atomic_write_text(CLASSES, json.dumps(classes, indent=2) + "\n")
    atomic_write_text(DECODING, json.dumps({"bit_depth": bit_depth}) + "\n")
    with atomic_write(REJECTED, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(REJECTED_COLUMNS)
        writer.writerows((printable(r.path), r.kind, printable(r.reason)) for r in rejected)
    with atomic_write(MANIFEST, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows((r.path, r.label, r.split, r.sha256) for r in rows)


def read(path: Path = MANIFEST) -> list[Row]:
    if not path.is_file():
        raise UserError(f"{path} not found: run `dvc repro prepare` first")
    with open(path, newline="", encoding="utf-8") as handle:
        return [Row(r["path"], r["label"], r["split"], r["sha256"]) for r in csv.DictReader(handle)]


def read_classes(path: Path = CLASSES) -> list[str]:
    return json.loads(path.read_text(encoding="utf-8"))


def read_bit_depth(path: Path = DECODING) -> BitDepth:
    """The rule prepare recorded for high-bit images (data.bit_depth); stages set it on their Preprocessing."""
    from transfer_learning.data.decode import BIT_DEPTHS, is_bit_depth

    if not path.is_file():
        raise UserError(f"{path} not found: run `dvc repro prepare` first")
    try:
        bit_depth = json.loads(path.read_text())["bit_depth"]
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path}: expected {{\"bit_depth\": ...}} ({type(error).__name__}: {error}); "
                        "run `dvc repro -f -s prepare`") from None
    if not is_bit_depth(bit_depth):
        raise UserError(f"{path}: bit_depth {bit_depth!r}; valid: auto, {', '.join(map(str, BIT_DEPTHS))}. "
                        "Set data.bit_depth in params.yaml and run `dvc repro -f -s prepare`")
    return bit_depth
