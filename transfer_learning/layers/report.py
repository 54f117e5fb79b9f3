"""The sweep's outputs: reports/layers.md, plots/layers/accuracy.csv (accuracy vs depth, a DVC plot),
metrics/layers.json and reports/timings/layers.json, or the skip record when `layers.enabled` is false (no plot:
plots/layers holds a note, common/curves.py). No torch here: a disabled stage starts fast."""
from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

from transfer_learning.common.atomic import atomic_write_text
from transfer_learning.common.curves import write_nothing_to_plot
from transfer_learning.common.metrics import write_metrics, write_timings

REPORT = Path("reports/layers.md")
PLOT = Path("plots/layers/accuracy.csv")
LAYERS_DIR = Path("models/layers")  # the stage's kept exports (graph.LAYERS_DIR); must exist as a DVC output
COLUMNS = ("block", "name", "feature_dim", "val_accuracy", "C", "head_seconds")


def write_plot(blocks: list[dict]) -> None:
    shutil.rmtree(PLOT.parent, ignore_errors=True)  # the skip's note included
    PLOT.parent.mkdir(parents=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(blocks)
    atomic_write_text(PLOT, text.getvalue())


def write_skipped() -> None:
    LAYERS_DIR.mkdir(parents=True, exist_ok=True)
    # a file in the folder: DVC warns on every default run about an empty output otherwise
    atomic_write_text(LAYERS_DIR / "README.txt", "The layer sweep's ONNX exports, kept (digest-checked) between "
                                                 "sweeps. Empty until `layers.enabled: true`.\n")
    write_nothing_to_plot(PLOT.parent, "layers.enabled is false: the layer sweep did not run, so there is no plot.")
    write_metrics("layers", {"enabled": False})
    write_timings("layers", {})
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(REPORT, "# Layer sweep\n\nDisabled (`layers.enabled: false`). Run it with "
                              "`dvc exp run -S layers.enabled=true`.\n")


def write_outputs(metrics: dict) -> None:
    """metrics/layers.json gets everything but the per-block table, which goes to the report and the plot, and the
    seconds, which go to the timings file and the report. It keeps each block's store folder (`block_fingerprints`):
    `stages.store gc` keeps the rows a revision's sweep names."""
    blocks, seconds = metrics.pop("blocks"), metrics.pop("seconds")
    metrics["block_fingerprints"] = {str(block["block"]): block["fingerprint"] for block in blocks}
    write_plot(blocks)
    write_metrics("layers", metrics)
    write_timings("layers", seconds)
    best = metrics["best"]
    adopted = metrics["adopted"].get(str(best["block"]), {})
    in_store = adopted.get("adopted", 0) + adopted.get("already_there", 0) == metrics["images"]
    lines = [
        "# Layer sweep",
        "",
        f"{metrics['arch']}, pool {metrics['pool']}: the logistic head on each block's pooled features, C chosen on "
        f"val. {metrics['images']} images ({metrics['computed']} computed, {metrics['reused']} reused from the "
        f"store) on {metrics['provider']}.",
        "",
        f"**Best: block {best['block']} ({best['name']}, {best['feature_dim']} features), val accuracy "
        f"{best['val_accuracy']:.4f}**: `backbone.cut: {best['block']}` uses it"
        + (" and finds all its rows in the store (adopted)." if in_store else "."),
        "",
        "| block | name | feature dim | val accuracy | C | head seconds |",
        "|---:|---|---:|---:|---:|---:|",
        *(f"| {b['block']} | {b['name']} | {b['feature_dim']} | {b['val_accuracy']:.4f} | {b['C']:g} | "
          f"{b['head_seconds']:.2f} |" for b in blocks),
        "",
        f"Seconds: sweep graph export {seconds['export']} (0 when kept), one pass over the images "
        f"{seconds['extract']}, heads {seconds['heads']}, adoption {seconds['adopt']}, total {seconds['total']}.",
        "",
    ]
    atomic_write_text(REPORT, "\n".join(lines))
