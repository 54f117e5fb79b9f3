"""ONNX exports kept between sweeps (models/layers/): the dynamo exporter takes 2-10 s per graph, so each file is
kept with a JSON record of what it was exported from (`recipe`) and the sha256 of its bytes. A file is reused only
when its recipe is the one asked for and its bytes still hash to the recorded digest; otherwise it is exported
again (and the log says why)."""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from transfer_learning.common.atomic import atomic_write_text
from transfer_learning.common.hashing import sha256_bytes

log = logging.getLogger(__name__)


def record_of(path: Path) -> Path:
    return path.with_suffix(".json")


def kept_export(path: Path, recipe: dict, export: Callable[[Path], None]) -> bytes:
    """The bytes of `path`, exported by `export(path)` unless a kept file of the same recipe checks out."""
    record = record_of(path)
    why = "not exported before"
    if path.is_file() and record.is_file():
        try:
            kept = json.loads(record.read_text())
        except ValueError:
            kept = {}
        if not isinstance(kept, dict) or kept.get("recipe") != recipe:
            why = "exported from another backbone, block list, pool, opset or library version"
        else:
            data = path.read_bytes()  # hashed and returned from the same bytes: no re-read in between
            if sha256_bytes(data) == kept.get("sha256"):
                log.info("%s: kept export reused (sha256 checked)", path)
                return data
            why = "its bytes fail the sha256 recorded when it was exported (damaged)"
            log.warning("%s %s; exporting it again", path, why)
    log.info("%s: exporting (%s)", path, why)
    record.unlink(missing_ok=True)  # no record pointing at a half-replaced file
    export(path)
    data = path.read_bytes()
    atomic_write_text(record, json.dumps({"recipe": recipe, "sha256": sha256_bytes(data)}, indent=2) + "\n")
    return data
