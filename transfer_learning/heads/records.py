"""metrics/heads/<name>.json: one head's record, written by its train_heads stage; metrics/heads.json: every head's
record as {name: record}, gathered from those files (by evaluate in the pipeline)."""
from __future__ import annotations

import json
from pathlib import Path

from transfer_learning.common.atomic import atomic_write_text

RECORDS_DIR = Path("metrics/heads")
COMBINED_RECORDS = Path("metrics/heads.json")


def write_record(name: str, record: dict) -> Path:
    path = RECORDS_DIR / f"{name}.json"
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def read_records(names: list[str]) -> dict[str, dict]:
    """{name: record} of the named heads that have one."""
    paths = {name: RECORDS_DIR / f"{name}.json" for name in names}
    return {name: json.loads(path.read_text()) for name, path in paths.items() if path.is_file()}


def write_combined(names: list[str]) -> dict[str, dict]:
    """metrics/heads.json from the named heads' records; returns it."""
    records = read_records(names)
    atomic_write_text(COMBINED_RECORDS, json.dumps(records, indent=2, sort_keys=True) + "\n")
    return records
