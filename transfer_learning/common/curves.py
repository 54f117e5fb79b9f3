"""Per-epoch training curves, written with dvclive: `<folder>/plots/metrics/<curve>.tsv` (columns step and the
curve's name; step = epoch). dvc.yaml declares the folder as the stage's output and as a plot; the stage's metrics
stay metrics/<stage>.json, so dvclive's summary (metrics.json) is not kept: in the plotted folder it would be drawn
as a chart of its own.

A stage with nothing to draw (a head fitted without epochs, a skipped fine-tune) leaves the folder with only
NOTHING_TO_PLOT, which says why. .dvcignore hides that file from DVC: DVC sees an empty output folder and draws no
chart for it, while git keeps the folder, so a fresh clone has the output DVC recorded. A curve file without rows
would be drawn as an empty chart.

DVC runs the pipeline, so dvclive writes no dvc.yaml and saves no experiment. The curves are written whole from
the history each time (not dvclive's resume): a run resumed from a checkpoint writes the same files as an
uninterrupted one.
"""
from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)
NOTHING_TO_PLOT = "nothing-to-plot.txt"  # named in .dvcignore


def write_curves(folder: Path, points: Iterable[tuple[int, str, float]], nothing_to_plot: str) -> None:
    """Replaces `folder` with the curves of `points` (step, curve name, value), in step order per curve; with no
    point at all, with NOTHING_TO_PLOT holding the sentence `nothing_to_plot` (why there is no curve)."""
    points = list(points)
    if not points:
        write_nothing_to_plot(folder, nothing_to_plot)
        return
    shutil.rmtree(folder, ignore_errors=True)
    from dvclive import Live  # here, not at the top: importing it is not free, and a skipped stage needs none
    from scmrepo.exceptions import SCMError

    try:
        live = Live(str(folder), dvcyaml=False, save_dvc_exp=False)
    except SCMError as error:  # dvclive 3.49 reads the git HEAD, and a repository without a commit has none
        log.warning("dvclive cannot run here (%s): %s written in its format without it", error, folder)
        _write_without_live(folder, points)
        return
    with live:
        for step, name, value in points:
            live.step = step
            live.log_metric(name, value)
    (folder / "metrics.json").unlink(missing_ok=True)


def write_nothing_to_plot(folder: Path, why: str) -> None:
    """Replaces `folder` with NOTHING_TO_PLOT alone, holding the sentence `why`."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / NOTHING_TO_PLOT).write_text(why.rstrip() + "\n")


def _write_without_live(folder: Path, points: list[tuple[int, str, float]]) -> None:
    from dvclive.plots import Metric

    metrics: dict[str, Metric] = {}
    for step, name, value in points:
        metric = metrics.setdefault(name, Metric(name, str(folder / "plots")))
        metric.step = step
        metric.dump(value)
