"""metrics/heads/<name>.json: one head's record (its type, what it chose on val, its val accuracy, its train rows),
written by its train_heads stage; the one place each head's val accuracy is written."""
from __future__ import annotations

import json
from pathlib import Path

from transfer_learning.common.atomic import atomic_write_text

RECORDS_DIR = Path("metrics/heads")


def write_record(name: str, record: dict) -> Path:
    path = RECORDS_DIR / f"{name}.json"
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path
