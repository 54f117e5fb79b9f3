"""Per-epoch training curves, written with dvclive: `<folder>/plots/metrics/<curve>.tsv` (columns step and the
curve's name; step = epoch) and dvclive's `<folder>/metrics.json` (the last step's values). dvc.yaml declares the
folder as the stage's output and plots `<folder>/plots/metrics`; the stage's metrics stay metrics/<stage>.json.

DVC runs the pipeline, so dvclive writes no dvc.yaml and saves no experiment. The curves are written whole from
the history each time (not dvclive's resume): a run resumed from a checkpoint writes the same files as an
uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)


def write_curves(folder: Path, points: Iterable[tuple[int, str, float]], empty: Sequence[str] = (),
                 summary: bool = True) -> None:
    """Replaces `folder` with the curves of `points` (step, curve name, value), in step order per curve. With no
    point at all (a skipped stage), the curves named in `empty` get their files with no rows, without dvclive:
    dvc.yaml plots the folder, and DVC reports a plotted folder that is missing (git keeps no empty one) as an
    error, an empty output folder with a warning. `summary=False` leaves out dvclive's metrics.json (the last
    step's values), for a folder that dvc.yaml plots whole."""
    shutil.rmtree(folder, ignore_errors=True)
    points = list(points)
    if not points:
        metrics_folder = folder / "plots" / "metrics"
        metrics_folder.mkdir(parents=True)
        for name in empty:
            (metrics_folder / f"{name}.tsv").write_text(f"step\t{name}\n")
        return
    from dvclive import Live  # here, not at the top: importing it is not free, and a skipped stage needs none
    from scmrepo.exceptions import SCMError

    try:
        live = Live(str(folder), dvcyaml=False, save_dvc_exp=False)
    except SCMError as error:  # dvclive 3.49 reads the git HEAD, and a repository without a commit has none
        log.warning("dvclive cannot run here (%s): %s written in its format without it", error, folder)
        _write_without_live(folder, points, with_summary=summary)
        return
    with live:
        for step, name, value in points:
            live.step = step
            live.log_metric(name, value)
    if not summary:
        (folder / "metrics.json").unlink(missing_ok=True)


def _write_without_live(folder: Path, points: list[tuple[int, str, float]], with_summary: bool = True) -> None:
    from dvclive.plots import Metric

    summary: dict = {}
    metrics: dict[str, Metric] = {}
    for step, name, value in points:
        metric = metrics.setdefault(name, Metric(name, str(folder / "plots")))
        metric.step = step
        metric.dump(value)
        *parents, leaf = name.split("/")
        node = summary
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    if points:
        summary["step"] = points[-1][0]
    folder.mkdir(parents=True, exist_ok=True)
    if with_summary:
        (folder / "metrics.json").write_text(json.dumps(summary, indent=4) + "\n")
