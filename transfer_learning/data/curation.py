"""data.exclude and data.relabel: CSV lists of images to leave out or to give another label, applied by prepare
after the split is drawn, so that every other image keeps its split. An image is named by its `sha256` column
(found wherever the file now lives) or else its `path` column (as the manifest writes it); relabel's new label is
in `label`, else `suggested_label`: the audit's lists (reports/audit/*.csv), copied and trimmed, are valid input.
The lists live in data/curation/, a dep of prepare in dvc.yaml, so an edited list re-runs prepare.

Features are keyed by the image's content, so excluding or relabelling images computes none. An entry that
matches no image is a warning with its count, never silent; a label that is not a class is an error naming the
file and line."""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from transfer_learning.common.errors import UserError
from transfer_learning.common.hashing import sha256_file
from transfer_learning.data.manifest import Rejection, Row, display_path

log = logging.getLogger("prepare")
LABEL_COLUMNS = ("label", "suggested_label")


@dataclass(frozen=True)
class Entry:
    key: str  # "sha256:<hex>" or "path:<manifest path>"
    label: str | None
    where: str  # file:line, for messages


def _key(record: dict[str, str]) -> str | None:
    if (record.get("sha256") or "").strip():
        return "sha256:" + record["sha256"].strip().lower()
    if (record.get("path") or "").strip():
        path = record["path"].strip()
        return "path:" + (display_path(Path(path)) if Path(path).exists() else path)
    return None


def read_list(name: str, relabel: bool) -> list[Entry]:
    key = "data.relabel" if relabel else "data.exclude"
    try:
        with open(name, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            if not {"path", "sha256"} & set(columns):
                raise UserError(f"{key}: {name} has no path or sha256 column (columns: {', '.join(columns) or 'none'})")
            label_column = next((c for c in LABEL_COLUMNS if c in columns), None)
            if relabel and label_column is None:
                raise UserError(f"{key}: {name} has no label or suggested_label column with the new labels "
                                f"(columns: {', '.join(columns)})")
            entries = []
            for line, record in enumerate(reader, 2):
                found = _key(record)
                if found is None:
                    raise UserError(f"{key}: {name}:{line} names no image (empty path and sha256)")
                entries.append(Entry(found, (record[label_column] or "").strip() if relabel else None,
                                     f"{name}:{line}"))
            return entries
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"{key}: cannot read {name} as a UTF-8 CSV file: {error}") from None


def list_digests(names: list[str]) -> dict[str, str]:
    """{file: sha256} of the lists, for metrics/prepare.json: an edited list shows there."""
    return {name: sha256_file(Path(name)) for name in names}


@dataclass(frozen=True)
class Curated:
    rows: list[Row]
    excluded: list[Rejection]
    relabelled: int
    unmatched: int


def curate(rows: list[Row], exclude: list[str], relabel: list[str], classes: list[str]) -> Curated:
    """The rows without the excluded images and with the new labels (an image both excluded and relabelled is
    excluded)."""
    index: dict[str, int] = {}
    for n, row in enumerate(rows):
        index[f"sha256:{row.sha256}"] = n
        index[f"path:{row.path}"] = n
    dropped: dict[int, str] = {}
    labels: dict[int, str] = {}
    unmatched = []
    for name in exclude:
        for entry in read_list(name, relabel=False):
            if entry.key in index:
                dropped.setdefault(index[entry.key], name)
            else:
                unmatched.append(entry)
    for name in relabel:
        for entry in read_list(name, relabel=True):
            if entry.label not in classes:
                raise UserError(f"data.relabel: {entry.where}: {entry.label!r} is not a class; valid: "
                                f"{', '.join(classes)}")
            if entry.key in index:
                labels[index[entry.key]] = entry.label
            else:
                unmatched.append(entry)
    if unmatched:
        log.warning("%d entr(y/ies) of data.exclude/data.relabel match no image of the source (e.g. %s: %s); "
                    "they are ignored", len(unmatched), unmatched[0].where, unmatched[0].key)
    kept = [replace(row, label=labels.get(n, row.label)) for n, row in enumerate(rows) if n not in dropped]
    relabelled = sum(1 for n, label in labels.items() if n not in dropped and label != rows[n].label)
    excluded = [Rejection(rows[n].path, "excluded", f"listed in {name} (data.exclude)")
                for n, name in sorted(dropped.items())]
    if excluded or relabelled:
        log.info("data.exclude: %d image(s) left out; data.relabel: %d image(s) relabelled", len(excluded),
                 relabelled)
    return Curated(kept, excluded, relabelled, len(unmatched))
