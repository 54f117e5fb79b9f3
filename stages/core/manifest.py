"""The prepared dataset: manifest.csv (path,label,split,sha256), classes.json, rejected.csv."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.core.errors import UserError

PREPARED = Path("data/prepared")
MANIFEST = PREPARED / "manifest.csv"
CLASSES = PREPARED / "classes.json"
REJECTED = PREPARED / "rejected.csv"
COLUMNS = ("path", "label", "split", "sha256")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Row:
    path: str
    label: str
    split: str
    sha256: str


def display_path(path: Path) -> str:
    """Relative to the project when inside it (portable manifests), absolute otherwise."""
    resolved = path.resolve()
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


def write(rows: list[Row], classes: list[str], rejected: list[tuple[str, str]]) -> None:
    PREPARED.mkdir(parents=True, exist_ok=True)
    with open(MANIFEST, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows((r.path, r.label, r.split, r.sha256) for r in rows)
    CLASSES.write_text(json.dumps(classes, indent=2) + "\n")
    with open(REJECTED, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("path", "reason"))
        writer.writerows(rejected)


def read(path: Path = MANIFEST) -> list[Row]:
    if not path.is_file():
        raise UserError(f"{path} not found: run `dvc repro prepare` first")
    with open(path, newline="") as handle:
        return [Row(r["path"], r["label"], r["split"], r["sha256"]) for r in csv.DictReader(handle)]


def read_classes(path: Path = CLASSES) -> list[str]:
    return json.loads(path.read_text())
