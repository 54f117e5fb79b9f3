"""The prepare stage's work: the source's images -> data/prepared/{manifest.csv, classes.json, rejected.csv,
decoding.json} and the metrics.

Every image is read once: its sha256 goes into the manifest and it is fully decoded. Every file of the source
that does not become a row is listed in rejected.csv with its kind and reason, never fatal: a name without an
image extension, a file outside a class folder, a symbolic link that leads to no file, a name that is not UTF-8,
a file that does not decode, an image whose shorter side is below data.min_side, an exact duplicate (the first
copy is kept), an image data.exclude lists (data/curation.py, which also applies data.relabel, after the split is
drawn: every other image keeps its split). A cap that drops images (data.per_class) is a warning with the counts per class, and both go into
the metrics. Fewer than 2 classes (in the data, or in its train split) fail here, before any expensive stage.
decoding.json records data.bit_depth, the rule every stage decodes high-bit images by.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tqdm import tqdm

from transfer_learning.common.errors import UserError
from transfer_learning.common.hashing import sha256_bytes
from transfer_learning.data import curation, manifest
from transfer_learning.data import sources
from transfer_learning.data.decode import BadImage, BitDepth, decode
from transfer_learning.data.manifest import Rejection
from transfer_learning.params import DataParams

log = logging.getLogger("prepare")
BUILTIN_IMAGES = manifest.PREPARED / "images"


@dataclass(frozen=True)
class Found:
    candidates: list[sources.Candidate]  # after data.per_class's cap
    available: Counter[str]  # images per class before the cap
    unusable: list[sources.Unusable]  # files of a folder source that are not candidates


def candidates(data: DataParams) -> Found:
    if data.source == "fashion-mnist":
        return Found(*sources.fashion_mnist_candidates(BUILTIN_IMAGES, data.cap, data.seed), [])
    if data.source == "digits":
        return Found(*sources.digits_candidates(BUILTIN_IMAGES, data.cap, data.seed), [])
    path = Path(data.source)
    found, unusable = (sources.csv_candidates(path), []) if path.is_file() else sources.folder_candidates(path)
    return Found(sources.cap_per_class(found, data.cap, data.seed), Counter(c.label for c in found), unusable)


def cap_origin(data: DataParams) -> str:
    """Where the cap in force comes from, in the words of params.yaml."""
    if data.per_class != "auto":
        return f"data.per_class: {'null' if data.per_class is None else data.per_class}"
    if data.builtin:
        return "data.per_class: auto, the demo's size for a built-in source"
    return "data.per_class: auto, a folder or CSV is used whole"


def capped_classes(data: DataParams, found: Found) -> dict[str, dict[str, int]]:
    """{class: {kept, available}} for each class the cap took images from; warns with the counts."""
    kept = Counter(c.label for c in found.candidates)
    capped = {label: {"kept": kept[label], "available": available}
              for label, available in sorted(found.available.items()) if kept[label] < available}
    if capped:
        shown = ", ".join(f"{manifest.printable(label)} {n['kept']} of {n['available']}"
                          for label, n in capped.items())
        log.warning("%s: at most %d images per class (%s): %d of %d images kept (%s); data.per_class: null uses "
                    "every image", data.source, data.cap, cap_origin(data), sum(kept.values()),
                    sum(found.available.values()), shown)
    return capped


def inspect(candidate: sources.Candidate, bit_depth: BitDepth, min_side: int) -> tuple[str | None, tuple[str, str]]:
    """(sha256, ("", "")) for a good image, (None, (kind, reason)) for a bad one."""
    if not manifest.is_utf8(manifest.display_path(candidate.path)):
        return None, ("name_not_utf8", "file or folder name is not valid UTF-8 (manifest.csv is UTF-8 text): rename it")
    try:
        data = candidate.path.read_bytes()
    except OSError as error:
        return None, ("unreadable", f"unreadable: {error.strerror}")
    try:
        image = decode(data, bit_depth)
    except BadImage as error:
        return None, ("undecodable", str(error))
    if min(image.size) < min_side:
        return None, ("too_small", f"{image.width}x{image.height} pixels: the shorter side is below data.min_side "
                                   f"({min_side}), too small to show what the backbone learnt to see")
    return sha256_bytes(data), ("", "")


def rejection_counts(rejected: list[Rejection], source: str) -> dict[str, int]:
    """Rejections per kind (duplicates and excluded images aside: metrics count them on their own); a warning when
    there are any."""
    counts = Counter(r.kind for r in rejected if r.kind not in ("duplicate", "excluded"))
    by_kind = {kind: counts[kind] for kind in manifest.REJECTION_KINDS if counts[kind]}
    if by_kind:
        log.warning("%d file(s) of %s not used, each listed with the reason in %s: %s", sum(by_kind.values()),
                    source, manifest.REJECTED, ", ".join(f"{n} {kind}" for kind, n in by_kind.items()))
    return by_kind


def too_few_classes(labels: set[str], source: str, where: str) -> UserError:
    shown = ", ".join(manifest.printable(label) for label in sorted(labels)) or "none"
    return UserError(f"data.source: {source} has {len(labels)} class(es) {where} ({shown}); a classifier needs at "
                     "least 2: add a <class> folder (or CSV label) with images")


def prepare(data: DataParams) -> dict:
    """The source's images -> data/prepared/*; returns metrics/prepare.json's dict."""
    started = time.perf_counter()
    found = candidates(data)
    if len(labels := {c.label for c in found.candidates}) < 2:
        raise too_few_classes(labels, data.source, "in total")
    capped = capped_classes(data, found)
    log.info("%d candidate images from %s", len(found.candidates), data.source)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(tqdm(pool.map(partial(inspect, bit_depth=data.bit_depth, min_side=data.min_side),
                                     found.candidates),
                            total=len(found.candidates), desc="prepare", unit="img"))

    rejected = [Rejection(manifest.display_path(u.path, follow_links=False), u.kind, u.reason)
                for u in found.unusable]
    first_copy: dict[str, sources.Candidate] = {}
    kept: list[tuple[sources.Candidate, str]] = []
    for candidate, (digest, (kind, reason)) in zip(found.candidates, results):
        path = manifest.display_path(candidate.path)
        if digest is None:
            rejected.append(Rejection(path, kind, reason))
        elif digest in first_copy:
            rejected.append(Rejection(path, "duplicate",
                                      f"duplicate of {manifest.display_path(first_copy[digest].path)}"))
        else:
            first_copy[digest] = candidate
            kept.append((candidate, digest))
    by_kind = rejection_counts(rejected, data.source)
    duplicates = sum(r.kind == "duplicate" for r in rejected)

    classes = sorted({c.label for c in found.candidates})
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
    curated = curation.curate(rows, data.exclude, data.relabel, classes)
    rows, rejected = curated.rows, rejected + curated.excluded
    if gone := [label for label in classes if label not in {r.label for r in rows}]:
        log.warning("class(es) %s have no image left after data.exclude/data.relabel: left out of %s",
                    ", ".join(map(manifest.printable, gone)), manifest.CLASSES)
        classes = [label for label in classes if label not in gone]
    per_class = Counter(r.label for r in rows)
    if len(trained := {r.label for r in rows if r.split == "train"}) < 2:
        manifest.write([], classes, rejected, data.bit_depth)
        raise too_few_classes(trained, data.source, "in the train split")
    manifest.write(rows, classes, rejected, data.bit_depth)

    split_counts = Counter(r.split for r in rows)
    metrics = {
        "source": data.source,
        "classes": len(classes),
        "available": sum(found.available.values()),
        "per_class_cap": data.cap,
        "per_class_cap_from": cap_origin(data),
        "capped": capped,
        "images": len(rows),
        "rejected": sum(by_kind.values()),
        "rejected_by_kind": by_kind,
        "duplicates": duplicates,
        "excluded": len(curated.excluded),
        "relabelled": curated.relabelled,
        "curation_unmatched": curated.unmatched,
        "curation_lists": curation.list_digests(data.exclude + data.relabel),
        "train": split_counts["train"],
        "val": split_counts["val"],
        "test": split_counts["test"],
        "min_per_class": min(per_class.values()),
        "max_per_class": max(per_class.values()),
        "bit_depth": data.bit_depth,
        "min_side": data.min_side,
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info(
        "%d images in %d classes (train %d, val %d, test %d); rejected %d, duplicates %d; high-bit images "
        "decoded by data.bit_depth %s -> %s",
        len(rows), len(classes), split_counts["train"], split_counts["val"], split_counts["test"],
        sum(by_kind.values()), duplicates, data.bit_depth, manifest.MANIFEST,
    )
    return metrics
