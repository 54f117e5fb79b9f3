"""Metrics files: JSON that `dvc metrics show` reads."""
import json
from pathlib import Path
from typing import Any

METRICS = Path("metrics")


def write_metrics(name: str, values: dict[str, Any]) -> Path:
    path = METRICS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    return path
