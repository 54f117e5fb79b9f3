"""The prepare stage's work: the source's images -> data/prepared/{manifest.csv, classes.json, rejected.csv,
decoding.json} and the metrics.

Every image is read once: its sha256 goes into the manifest and it is fully decoded; files that do not decode,
names that are not UTF-8 and symbolic links that lead to no file are listed in rejected.csv with the reason, never
fatal. Exact duplicate files keep their first copy only. Fewer than 2 classes (in the data, or in its train
split) fail here, before any expensive stage. decoding.json records data.bit_depth, the rule every stage decodes
high-bit images by.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from tqdm import tqdm

from transfer_learning.common.errors import UserError
from transfer_learning.common.hashing import sha256_bytes
from transfer_learning.data import manifest
from transfer_learning.data import sources
from transfer_learning.data.decode import BadImage, BitDepth, decode
from transfer_learning.params import DataParams

log = logging.getLogger("prepare")
BUILTIN_IMAGES = manifest.PREPARED / "images"


def candidates(data: DataParams) -> tuple[list[sources.Candidate], list[tuple[Path, str]]]:
    """(the candidates, capped per class; entries of the source that cannot be candidates, with the reason)."""
    if data.source == "fashion-mnist":
        return sources.fashion_mnist_candidates(BUILTIN_IMAGES, data.per_class, data.seed), []
    if data.source == "digits":
        return sources.digits_candidates(BUILTIN_IMAGES, data.per_class, data.seed), []
    path = Path(data.source)
    found, unusable = (sources.csv_candidates(path), []) if path.is_file() else sources.folder_candidates(path)
    return sources.cap_per_class(found, data.per_class, data.seed), unusable


def inspect(candidate: sources.Candidate, bit_depth: BitDepth) -> tuple[str | None, str | None]:
    """(sha256, None) for a good image, (None, reason) for a bad one."""
    if not manifest.is_utf8(manifest.display_path(candidate.path)):
        return None, "file or folder name is not valid UTF-8 (manifest.csv is UTF-8 text): rename it"
    try:
        data = candidate.path.read_bytes()
    except OSError as error:
        return None, f"unreadable: {error.strerror}"
    try:
        decode(data, bit_depth)
    except BadImage as error:
        return None, str(error)
    return sha256_bytes(data), None


def too_few_classes(labels: set[str], source: str, where: str) -> UserError:
    shown = ", ".join(manifest.printable(label) for label in sorted(labels)) or "none"
    return UserError(f"data.source: {source} has {len(labels)} class(es) {where} ({shown}); a classifier needs at "
                     "least 2: add a <class> folder (or CSV label) with images")


def prepare(data: DataParams) -> dict:
    """The source's images -> data/prepared/*; returns metrics/prepare.json's dict."""
    started = time.perf_counter()
    found, unusable = candidates(data)
    if len(labels := {c.label for c in found}) < 2:
        raise too_few_classes(labels, data.source, "in total")
    log.info("%d candidate images from %s", len(found), data.source)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(tqdm(pool.map(partial(inspect, bit_depth=data.bit_depth), found), total=len(found),
                            desc="prepare", unit="img"))

    rejected = [(manifest.display_path(path, follow_links=False), reason) for path, reason in unusable]
    first_copy: dict[str, sources.Candidate] = {}
    kept: list[tuple[sources.Candidate, str]] = []
    duplicates = 0
    for candidate, (digest, reason) in zip(found, results):
        path = manifest.display_path(candidate.path)
        if digest is None:
            rejected.append((path, reason))
        elif digest in first_copy:
            duplicates += 1
            rejected.append((path, f"duplicate of {manifest.display_path(first_copy[digest].path)}"))
        else:
            first_copy[digest] = candidate
            kept.append((candidate, digest))

    classes = sorted({c.label for c in found})
    per_class = Counter(c.label for c, _ in kept)
    empty = [label for label in classes if per_class[label] == 0]
    if empty:
        manifest.write([], classes, rejected, data.bit_depth)  # the rejection report survives the error
        raise UserError(f"every image of class(es) {', '.join(map(manifest.printable, empty))} was rejected; "
                        f"see {manifest.REJECTED} for the reasons")

    free = [i for i, (c, _) in enumerate(kept) if c.split is None]
    drawn = manifest.stratified_splits(
        [kept[i][0].label for i in free], data.val_fraction, data.test_fraction, data.seed
    ) if free else []
    splits = [c.split for c, _ in kept]
    for i, split in zip(free, drawn):
        splits[i] = split
    rows = [
        manifest.Row(manifest.display_path(c.path), c.label, split, digest)
        for (c, digest), split in zip(kept, splits)
    ]
    if len(trained := {r.label for r in rows if r.split == "train"}) < 2:
        manifest.write([], classes, rejected, data.bit_depth)
        raise too_few_classes(trained, data.source, "in the train split")
    manifest.write(rows, classes, rejected, data.bit_depth)

    split_counts = Counter(r.split for r in rows)
    metrics = {
        "source": data.source,
        "classes": len(classes),
        "images": len(rows),
        "rejected": len(rejected) - duplicates,
        "duplicates": duplicates,
        "train": split_counts["train"],
        "val": split_counts["val"],
        "test": split_counts["test"],
        "min_per_class": min(per_class.values()),
        "max_per_class": max(per_class.values()),
        "bit_depth": data.bit_depth,
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info(
        "%d images in %d classes (train %d, val %d, test %d); rejected %d, duplicates %d; high-bit images "
        "decoded by data.bit_depth %s -> %s",
        len(rows), len(classes), split_counts["train"], split_counts["val"], split_counts["test"],
        len(rejected) - duplicates, duplicates, data.bit_depth, manifest.MANIFEST,
    )
    return metrics
