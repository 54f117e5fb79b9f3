"""Metrics files: JSON that `dvc metrics show` and `dvc exp show` read (metrics/<name>.json), and timings files:
how long a stage took (reports/timings/<name>.json), which change on every run and so are kept out of the metrics:
`dvc exp show` compares what experiments computed, not how fast the machine was that day."""
import json
from pathlib import Path
from typing import Any

from transfer_learning.common.atomic import atomic_write_text

METRICS = Path("metrics")
TIMINGS = Path("reports/timings")
# the wall-clock fields the stages measure; `pop_timings` moves them from a stage's result to its timings file
TIMING_KEYS = ("seconds", "compute_seconds", "images_per_s", "train_seconds", "epoch_seconds",
               "ray_startup_seconds", "rows_per_s_per_actor")


def write_metrics(name: str, values: dict[str, Any]) -> Path:
    return _write_json(METRICS / f"{name}.json", values)


def write_timings(name: str, values: dict[str, Any]) -> Path:
    """reports/timings/<name>.json (`name` may hold a folder: heads/<head>)."""
    return _write_json(TIMINGS / f"{name}.json", values)


def read_timings(name: str) -> dict[str, Any]:
    """What write_timings wrote under `name`; {} when there is no such file or it is not a JSON object."""
    try:
        values = json.loads((TIMINGS / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


def pop_timings(values: dict[str, Any]) -> dict[str, Any]:
    """The timing fields of a stage's result, removed from it."""
    return {key: values.pop(key) for key in TIMING_KEYS if key in values}


def write_stage_results(name: str, values: dict[str, Any]) -> Path:
    """A stage's result: its timing fields (removed from `values`) to reports/timings/<name>.json, the rest to
    metrics/<name>.json."""
    write_timings(name, pop_timings(values))
    return write_metrics(name, values)


def _write_json(path: Path, values: dict[str, Any]) -> Path:
    atomic_write_text(path, json.dumps(values, indent=2, sort_keys=True) + "\n")
    return path
