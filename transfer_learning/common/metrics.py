"""Metrics files: JSON that `dvc metrics show` reads."""
import json
from pathlib import Path
from typing import Any

from transfer_learning.common.atomic import atomic_write_text

METRICS = Path("metrics")


def write_metrics(name: str, values: dict[str, Any]) -> Path:
    path = METRICS / f"{name}.json"
    atomic_write_text(path, json.dumps(values, indent=2, sort_keys=True) + "\n")
    return path
