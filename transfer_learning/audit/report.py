"""The audit's outputs: reports/audit/{label_issues,near_duplicates,outliers}.csv, a contact sheet (PNG) of the top
of each list, the map (reports/audit/map.png and plots/audit/map.csv, a DVC scatter plot), reports/audit.md,
metrics/audit.json and reports/timings/audit.json; or, with `audit.enabled: false`, a skip record.

The CSVs name each image by its manifest path and sha256, so that `data.exclude` and `data.relabel` take (a copy
of) them as they are: near_duplicates.csv's `path` is the member of each pair to drop (a test image is kept over
val and train, a val image over train), label_issues.csv's `suggested_label` is the label to give."""
from __future__ import annotations

import csv
import io
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from transfer_learning.audit.contact_sheet import Tile, draw_sheet
from transfer_learning.audit.map_image import draw_map
from transfer_learning.audit.run import AuditResult
from transfer_learning.common.atomic import atomic_write_text
from transfer_learning.common.curves import write_nothing_to_plot
from transfer_learning.common.metrics import write_metrics, write_timings
from transfer_learning.data import manifest
from transfer_learning.params import AuditParams

REPORT = Path("reports/audit.md")
FOLDER = Path("reports/audit")
LABEL_ISSUES = FOLDER / "label_issues.csv"
NEAR_DUPLICATES = FOLDER / "near_duplicates.csv"
OUTLIERS = FOLDER / "outliers.csv"
MAP_PNG = FOLDER / "map.png"
MAP_PLOT = Path("plots/audit/map.csv")
log = logging.getLogger("audit")
SHEET = {"label_issues": FOLDER / "label_issues.png", "near_duplicates": FOLDER / "near_duplicates.png",
         "outliers": FOLDER / "outliers.png"}
LABEL_ISSUE_COLUMNS = ("rank", "path", "sha256", "split", "given_label", "suggested_label", "p_given",
                       "p_suggested")
NEAR_DUPLICATE_COLUMNS = ("path", "sha256", "split", "label", "duplicate_of", "duplicate_of_split",
                          "duplicate_of_label", "cosine", "score")
OUTLIER_COLUMNS = ("rank", "path", "sha256", "split", "label", "typicality")
SHOWN = 10  # rows of each list in reports/audit.md
# points in plots/audit/map.csv at most (every flagged image, then a seeded sample of the others): a browser draws
# 5,000 points of `dvc plots show` at once, not 70,000; map.png draws every image
MAP_POINTS_MAX = 5000


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def label_issue_rows(result: AuditResult) -> list[dict]:
    images, issues = result.images, result.issues
    if issues is None:
        return []
    rows = np.flatnonzero(images.labelled)
    probabilities = result.out_of_fold.probabilities
    out = []
    for rank, i in enumerate(issues.flagged, 1):
        image, suggested = int(rows[i]), int(issues.suggested[i])
        out.append({"rank": rank, "path": images.paths[image], "sha256": images.sha256[image],
                    "split": images.splits[image], "given_label": images.classes[images.labels[image]],
                    "suggested_label": images.classes[suggested],
                    "p_given": round(float(probabilities[i, images.labels[image]]), 4),
                    "p_suggested": round(float(probabilities[i, suggested]), 4)})
    return out


def near_duplicate_rows(result: AuditResult) -> list[dict]:
    images = result.images
    return [{"path": images.paths[drop], "sha256": images.sha256[drop], "split": images.splits[drop],
             "label": images.classes[images.labels[drop]], "duplicate_of": images.paths[keep],
             "duplicate_of_split": images.splits[keep], "duplicate_of_label": images.classes[images.labels[keep]],
             "cosine": round(cosine, 4), "score": round(score, 3)}
            for drop, keep, cosine, score in result.copies.pairs]


def outlier_rows(result: AuditResult) -> list[dict]:
    images, found = result.images, result.outliers
    return [{"rank": rank, "path": images.paths[i], "sha256": images.sha256[i], "split": images.splits[i],
             "label": images.classes[images.labels[i]], "typicality": round(float(found.typicality[i]), 4)}
            for rank, i in enumerate(found.flagged, 1)]


def flagged_images(result: AuditResult) -> dict[str, set[int]]:
    rows = np.flatnonzero(result.images.labelled)
    return {"label_issue": {int(rows[i]) for i in (result.issues.flagged if result.issues else [])},
            "near_copy": {i for pair in result.copies.pairs for i in pair[:2]},
            "outlier": {int(i) for i in result.outliers.flagged}}


def plotted(flag_of: list[str], seed: int) -> np.ndarray:
    """The indices map.csv holds: all when at most MAP_POINTS_MAX, else every flagged image and a seeded sample."""
    if len(flag_of) <= MAP_POINTS_MAX:
        return np.arange(len(flag_of))
    flagged = np.array([flag != "none" for flag in flag_of])
    others = np.flatnonzero(~flagged)
    room = max(0, MAP_POINTS_MAX - int(flagged.sum()))
    sample = np.random.default_rng(seed).choice(others, min(room, len(others)), replace=False)
    return np.sort(np.concatenate([np.flatnonzero(flagged), sample]))


def write_map(result: AuditResult, kind: str, seed: int) -> int:
    """plots/audit/map.csv and reports/audit/map.png; returns the points in map.csv."""
    images = result.images
    flags = flagged_images(result)
    flag_of = ["+".join(name for name, members in flags.items() if i in members) or "none"
               for i in range(len(images.labels))]
    shutil.rmtree(MAP_PLOT.parent, ignore_errors=True)
    MAP_PLOT.parent.mkdir(parents=True)
    shown = plotted(flag_of, seed)
    write_csv(MAP_PLOT, ("x", "y", "label", "split", "flag", "path"),
              [{"x": round(float(result.points[i, 0]), 5), "y": round(float(result.points[i, 1]), 5),
                "label": images.classes[images.labels[i]], "split": images.splits[i], "flag": flag_of[i],
                "path": images.paths[i]} for i in shown])
    draw_map(MAP_PNG, result.points, images.labels, images.classes,
             np.array([flag != "none" for flag in flag_of], bool),
             f"{len(images.labels)} images, {kind.upper()} of their features; ringed: flagged")
    return len(shown)


def write_sheets(result: AuditResult, sheet: int, issues: list[dict], copies: list[dict],
                 outlying: list[dict]) -> None:
    bit_depth = manifest.read_bit_depth()
    draw_sheet(SHEET["label_issues"], [Tile(r["path"], (f"{r['given_label']} -> {r['suggested_label']}",
                                                        f"p {r['p_given']:.2f} -> {r['p_suggested']:.2f}"))
                                       for r in issues[:sheet]],
               bit_depth, f"The {min(sheet, len(issues))} likeliest label issues: given -> suggested label")
    tiles = []
    for r in copies[:sheet // 2]:
        tiles += [Tile(r["path"], (f"{r['split']}: {r['label']}", f"cosine {r['cosine']:.3f}")),
                  Tile(r["duplicate_of"], (f"{r['duplicate_of_split']}: {r['duplicate_of_label']}", "(kept)"))]
    draw_sheet(SHEET["near_duplicates"], tiles, bit_depth,
               f"{min(sheet // 2, len(copies))} near-copy pairs: the one to drop, then the one kept")
    draw_sheet(SHEET["outliers"], [Tile(r["path"], (f"{r['split']}: {r['label']}", f"typicality {r['typicality']}"))
                                   for r in outlying[:sheet]],
               bit_depth, f"The {min(sheet, len(outlying))} least typical images")


def metrics_of(result: AuditResult, params: AuditParams, map_points: int) -> dict:
    from transfer_learning.audit.near_copies import leaks

    images = result.images
    labelled = int(images.labelled.sum())
    found = {
        "enabled": True,
        "images": len(images.labels),
        "train_val_images": labelled,
        "label_issues": len(result.issues.flagged) if result.issues else 0,
        "label_issues_looked_for": result.issues is not None,
        "near_copy_pairs": len(result.copies.pairs),
        **leaks(result.copies.pairs, images.splits),
        "near_copy_threshold": round(result.copies.threshold, 4),
        "outliers": len(result.outliers.flagged),
        "outlier_threshold": round(result.outliers.threshold, 4),
        "map": params.map,
        "map_points": map_points,
        "neighbour_search_dims": result.search_dims,
    }
    if result.issues is not None:
        found.update({
            "label_issue_share": round(found["label_issues"] / labelled, 4),
            "estimated_noise_rate": round(1.0 - float(np.trace(result.issues.joint)), 4),
            "folds": result.out_of_fold.folds,
            "out_of_fold_accuracy": {"logistic": round(result.out_of_fold.logistic_accuracy, 4),
                                     "neighbours": round(result.out_of_fold.neighbour_accuracy, 4)},
        })
    return found


def table(rows: list[dict], columns: tuple[str, ...]) -> list[str]:
    if not rows:
        return ["None found."]
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(str(r[c]).replace("|", "\\|") for c in columns) + " |" for r in rows[:SHOWN])]


def markdown(found: dict, issues: list[dict], copies: list[dict], outlying: list[dict]) -> str:
    leaked = found["test_with_train_copy"] + found["val_with_train_copy"]
    label_part = (f"**{found['label_issues']} likely label issues** among {found['train_val_images']} train and val "
                  f"images ({100 * found['label_issue_share']:.1f} %; confident learning's estimated noise rate "
                  f"{100 * found['estimated_noise_rate']:.1f} %), from out-of-fold probabilities ({found['folds']} "
                  f"folds; accuracy: logistic {found['out_of_fold_accuracy']['logistic']:.3f}, neighbours "
                  f"{found['out_of_fold_accuracy']['neighbours']:.3f})."
                  if found["label_issues_looked_for"] else
                  "Label issues were not looked for: train and val hold too few images (see the stage's log).")
    lines = [
        "# Data audit",
        "",
        f"{found['images']} images, audited on their cached features (no image was run through the backbone).",
        "",
        f"- {label_part}",
        f"- **{found['near_copy_pairs']} near-copy pairs**; {found['test_with_train_copy']} test and "
        f"{found['val_with_train_copy']} val images have a near-copy in train, {found['test_with_val_copy']} test "
        "images one in val" + (": test and val accuracies are optimistic until they are removed." if leaked else "."),
        f"- **{found['outliers']} outliers**: images far from every class.",
        "",
        "Full lists: `reports/audit/label_issues.csv`, `reports/audit/near_duplicates.csv`, "
        "`reports/audit/outliers.csv`; contact sheets and the map (`reports/audit/map.png`, "
        "or `dvc plots show`) beside them.",
        "",
        "## Label issues (likeliest first)",
        "",
        "![label issues](audit/label_issues.png)",
        "",
        *table(issues, ("rank", "path", "split", "given_label", "suggested_label", "p_given")),
        "",
        "## Near-copies (the one to drop, then the one kept)",
        "",
        "![near-copies](audit/near_duplicates.png)",
        "",
        *table(copies, ("path", "split", "duplicate_of", "duplicate_of_split", "cosine")),
        "",
        "## Outliers (least typical first)",
        "",
        "![outliers](audit/outliers.png)",
        "",
        *table(outlying, ("rank", "path", "split", "label", "typicality")),
        "",
        "## The map",
        "",
        "![map](audit/map.png)",
        "",
        f"`plots/audit/map.csv` (drawn by `dvc plots show`) holds {found['map_points']} of the {found['images']} "
        "images" + (": every flagged one and a seeded sample of the others." if found["map_points"] < found["images"]
                    else "."),
        "",
        "## What to do next",
        "",
        "Look at the contact sheets, then copy the rows you agree with into files of your own (the audit rewrites "
        "its lists on every run) and name them in `params.yaml`:",
        "",
        "```bash",
        "cp reports/audit/near_duplicates.csv data/exclude.csv   # keep the pairs that are copies",
        "cp reports/audit/label_issues.csv data/relabel.csv      # keep the rows whose suggested_label is right",
        "dvc exp run -S 'data.exclude=[data/exclude.csv]' -S 'data.relabel=[data/relabel.csv]'",
        "```",
        "",
        "prepare drops the excluded images (listed in `data/prepared/rejected.csv`) and gives the relabelled ones "
        "their new label; every other image keeps its split, and no feature is computed again (they are keyed by "
        "the image's content).",
        "",
    ]
    return "\n".join(lines)


def write_outputs(result: AuditResult, params: AuditParams) -> dict:
    started = time.perf_counter()
    shutil.rmtree(FOLDER, ignore_errors=True)
    FOLDER.mkdir(parents=True)
    issues, copies, outlying = label_issue_rows(result), near_duplicate_rows(result), outlier_rows(result)
    write_csv(LABEL_ISSUES, LABEL_ISSUE_COLUMNS, issues)
    write_csv(NEAR_DUPLICATES, NEAR_DUPLICATE_COLUMNS, copies)
    write_csv(OUTLIERS, OUTLIER_COLUMNS, outlying)
    write_sheets(result, params.sheet, issues, copies, outlying)
    found = metrics_of(result, params, write_map(result, params.map, params.seed))
    atomic_write_text(REPORT, markdown(found, issues, copies, outlying))
    write_metrics("audit", found)
    write_timings("audit", {**result.seconds, "outputs": round(time.perf_counter() - started, 3),
                            "seconds": round(result.seconds["compute"] + time.perf_counter() - started, 3)})
    log.info("%d images from their cached features (none through the backbone): %d likely label issues, %d "
             "near-copy pairs, %d outliers -> %s", found["images"], len(issues), len(copies), len(outlying), REPORT)
    leaks = {split: found.get(f"{split}_with_train_copy", 0) for split in ("test", "val")}
    if any(leaks.values()):
        log.warning("%d test and %d val images have a near-copy in train: their accuracies are optimistic "
                    "(reports/audit/near_duplicates.csv; data.exclude leaves such images out)",
                    leaks["test"], leaks["val"])
    return found


def write_skipped() -> None:
    log.info("audit.enabled is false: skipped (reports/audit.md says how to run it)")
    shutil.rmtree(FOLDER, ignore_errors=True)
    FOLDER.mkdir(parents=True)
    # a file in the folder: DVC warns on every run about an empty output otherwise
    atomic_write_text(FOLDER / "README.txt", "The data audit's lists and images. Empty: audit.enabled is false.\n")
    write_nothing_to_plot(MAP_PLOT.parent, "audit.enabled is false: the audit did not run, so there is no map.")
    write_metrics("audit", {"enabled": False})
    write_timings("audit", {})
    atomic_write_text(REPORT, "# Data audit\n\nDisabled (`audit.enabled: false`). Run it with "
                              "`dvc exp run -S audit.enabled=true`.\n")
