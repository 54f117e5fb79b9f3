"""The data audit against planted problems, on the default data's cached features.

    .venv/bin/python benchmarks/audit.py [--large 70000] [--reps 5]      (from the repo root, after `dvc repro`)

Seeded throughout (seed 0), on data/features and data/prepared as `dvc repro` left them (3,000 Fashion-MNIST
images, MobileNetV2 features):
1. Label issues: 5 % and 10 % of the train+val labels flipped to another class at random. Precision and recall of
   the flagged set (confident learning, audit/confident_learning.py) and precision among the k lowest-ranked
   images (k = the number flipped), for the audit's probabilities (the logistic head's and the neighbours' votes,
   averaged) and, as ablations, each alone; the plain baseline: a 5-fold cross_val_predict of a logistic
   regression on the standardized features (C of metrics/heads/logreg.json), ranked by the given label's
   probability, with confident learning on its probabilities.
2. Leaks: 20 test images re-encoded as JPEG (quality 90, same size) through the project's backbone
   (models/backbone.onnx, extract's preprocessing) and added to train. The share of planted copies the audit pairs
   with their original, and the images wrongly paired (in a pair that was not planted), listed.
3. The stage as DVC runs it (its own process, imports included) on the 3,000 images: --reps repetitions after a
   warm-up, wall seconds (median, spread) and the CPU seconds of one run.
4. --large N (0 skips): the audit's computation on N rows made from the 3,000 real ones (tiled, each copy moved
   by noise of 5 % of the features' spread, so that no two rows are copies), one run, wall and CPU seconds:
   the cost at the size of Fashion-MNIST whole (70,000), features cached.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_process import run_stage  # noqa: E402
from timing import repeat  # noqa: E402

from transfer_learning.audit.confident_learning import find_label_issues, ranking_score  # noqa: E402
from transfer_learning.audit.near_copies import NEXT, near_copies  # noqa: E402
from transfer_learning.audit.neighbours import nearest, unit_rows  # noqa: E402
from transfer_learning.audit.out_of_fold import (logistic_out_of_fold, neighbour_votes, out_of_fold,  # noqa: E402
                                                 projected)
from transfer_learning.audit.outliers import outliers  # noqa: E402
from transfer_learning.audit.run import Images, read_images  # noqa: E402
from transfer_learning.params import AuditParams  # noqa: E402

SEED = 0
COPIES = 20
JPEG_QUALITY = 90


def flipped(labels: np.ndarray, rate: float, classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, indices flipped): round(rate * n) labels moved to another class, uniformly."""
    which = rng.choice(len(labels), int(round(rate * len(labels))), replace=False)
    noisy = labels.copy()
    noisy[which] = (labels[which] + rng.integers(1, classes, len(which))) % classes
    return noisy, which


def scores_of(flagged: np.ndarray, ranking: np.ndarray, flips: np.ndarray) -> dict[str, float]:
    truth = set(flips.tolist())
    hits = sum(int(i) in truth for i in flagged)
    precision = hits / max(len(flagged), 1)
    recall = hits / len(flips)
    lowest = np.argsort(ranking, kind="stable")[:len(flips)]
    return {"flagged": len(flagged), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / max(precision + recall, 1e-12),
            "precision_at_k": sum(int(i) in truth for i in lowest) / len(flips)}


def plain_baseline(features: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """A 5-fold cross_val_predict of a standardized logistic regression, the logistic head's C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    record = REPO / "metrics/heads/logreg.json"
    C = json.loads(record.read_text())["params"]["C"] if record.is_file() else 1.0
    with threadpool_limits(1):
        return cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000)),
                                 features, labels, cv=5, method="predict_proba")


def label_issues(images: Images, params: AuditParams) -> None:
    rows = np.flatnonzero(images.labelled)
    features, clean = images.features[rows], images.labels[rows]
    classes = len(images.classes)
    unit = unit_rows(features)
    (votes_index, _), = nearest(unit, unit, np.arange(len(unit)), [(params.neighbors, None)])
    components = projected(images.features, params.dims, params.seed)[rows]
    doubtful = find_label_issues(out_of_fold(components, clean, clean[votes_index], classes, folds=params.folds,
                                             seed=params.seed, C=params.C).probabilities, clean, params.rank_by)
    doubtful = set(doubtful.flagged.tolist())
    print(f"\n1. Label issues: {len(rows)} train+val images, labels flipped at random (seed {SEED}). With no label "
          f"flipped, the audit flags {len(doubtful)} ({100 * len(doubtful) / len(rows):.1f} %): Fashion-MNIST's own "
          "doubtful labels, counted as false positives below; the last column leaves them out of the flagged "
          "set\n")
    print("| flipped | probabilities | flagged | precision | recall | F1 | precision@k | F1 without the doubtful |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for rate in (0.05, 0.10):
        noisy, flips = flipped(clean, rate, classes, np.random.default_rng(SEED))
        audit = out_of_fold(components, noisy, noisy[votes_index], classes, folds=params.folds, seed=params.seed,
                            C=params.C)
        standardized = components / components.std(axis=0)
        logistic = logistic_out_of_fold(standardized, noisy, classes, audit.folds, params.seed, params.C)
        sides = {"audit (logistic + neighbours)": audit.probabilities, "logistic head alone": logistic,
                 "neighbours' votes alone": neighbour_votes(noisy[votes_index], classes),
                 "plain baseline (cross_val_predict)": plain_baseline(features, noisy, classes)}
        for name, probabilities in sides.items():
            found = find_label_issues(probabilities, noisy, params.rank_by)
            s = scores_of(found.flagged, ranking_score(probabilities, noisy, params.rank_by), flips)
            kept = np.array([i for i in found.flagged if i not in doubtful or i in set(flips.tolist())], int)
            apart = scores_of(kept, ranking_score(probabilities, noisy, params.rank_by), flips)
            print(f"| {100 * rate:.0f} % ({len(flips)}) | {name} | {s['flagged']} | {s['precision']:.2f} | "
                  f"{s['recall']:.2f} | {s['f1']:.2f} | {s['precision_at_k']:.2f} | {apart['f1']:.2f} |")
        margin = scores_of(np.array([], int), ranking_score(audit.probabilities, noisy, "normalized_margin"), flips)
        print(f"| {100 * rate:.0f} % ({len(flips)}) | audit, ranked by normalized margin | | | | | "
              f"{margin['precision_at_k']:.2f} | |")


def jpeg_copies_features(paths: list[str]) -> np.ndarray:
    from PIL import Image

    from transfer_learning.backbone import files as backbone_files
    from transfer_learning.data import manifest
    from transfer_learning.data.pixels import evaluation_inputs
    from transfer_learning.features.runtime import FeatureRunner

    backbone = backbone_files.load()
    preprocessing = backbone.preprocessing.with_bit_depth(manifest.read_bit_depth())
    runner = FeatureRunner(backbone_files.ONNX.read_bytes(), ["CPUExecutionProvider"], len(paths))
    encoded = []
    for path in paths:
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").save(buffer, "JPEG", quality=JPEG_QUALITY)
        encoded.append(buffer.getvalue())
    return runner(evaluation_inputs(encoded, preprocessing))


def leaks(images: Images, params: AuditParams) -> None:
    rng = np.random.default_rng(SEED)
    tests = np.flatnonzero(np.array(images.splits) == "test")
    originals = rng.choice(tests, COPIES, replace=False)
    copies = jpeg_copies_features([images.paths[i] for i in originals])
    features = np.concatenate([images.features, copies])
    splits = images.splits + ["train"] * COPIES
    paths = images.paths + [f"(JPEG copy of {images.paths[i]})" for i in originals]
    n = len(features)
    unit = unit_rows(features)
    (index, similarity), = nearest(unit, unit, np.arange(n), [(NEXT + 1, None)])
    planted = {frozenset((len(images.features) + c, int(o))) for c, o in enumerate(originals)}
    cosines = [float(unit[len(images.features) + c] @ unit[o]) for c, o in enumerate(originals)]
    print(f"\n2. Leaks: {COPIES} test images re-encoded as JPEG (quality {JPEG_QUALITY}, same size) and added to "
          f"train; cosine to their originals {min(cosines):.3f}-{max(cosines):.3f}\n")
    print("| near_copy_z | threshold | planted found | images wrongly paired | share of images |")
    print("|---:|---:|---:|---:|---:|")
    wrong_pairs = []
    for z in sorted({4.0, params.near_copy_z, 6.0}):
        found = near_copies(index, similarity, splits, z)
        pairs = {frozenset(p[:2]) for p in found.pairs}
        wrong = {i for p in pairs - planted for i in p}
        print(f"| {z:g} | {found.threshold:.3f} | {len(planted & pairs)} of {COPIES} | {len(wrong)} | "
              f"{100 * len(wrong) / n:.2f} % |")
        if z == params.near_copy_z:
            wrong_pairs = [p for p in found.pairs if frozenset(p[:2]) not in planted]
    print(f"\nThe pairs that were not planted, at the default near_copy_z {params.near_copy_z:g}:\n")
    for drop, keep, cosine, score in wrong_pairs:
        print(f"- {paths[drop]} ({splits[drop]}) ~ {paths[keep]} ({splits[keep]}): cosine {cosine:.3f}, "
              f"score {score:.2f}")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def stage_timing(reps: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        project = Path(folder)
        (project / "data").mkdir()
        for name in ("features", "prepared"):
            (project / "data" / name).symlink_to(REPO / "data" / name)
        shutil.copy(REPO / "params.yaml", project / "params.yaml")
        run_stage(project, "audit")  # warm-up, and the figures below
        before = children_cpu_seconds()
        timing = repeat(lambda: run_stage(project, "audit"), reps=reps, warmup=0)
        cpu = (children_cpu_seconds() - before) / reps
        metrics = json.loads((project / "metrics/audit.json").read_text())
        parts = json.loads((project / "reports/timings/audit.json").read_text())
    print(f"\n3. The audit stage on {metrics['images']} images, its own process: wall {timing}; CPU {cpu:.1f} s per "
          f"run (2 cores). Inside the last run: {parts}")


def large(rows: int, images: Images, params: AuditParams) -> None:
    from transfer_learning.audit.run import EXACT_SEARCH_MAX, SEARCH_DIMS

    rng = np.random.default_rng(SEED)
    base = images.features
    take = rng.integers(0, len(base), rows)
    features = base[take] + rng.normal(0, 0.05, (rows, base.shape[1])).astype(np.float32) * base.std(axis=0)
    labels = images.labels[take]
    splits = [["train", "val", "test"][k] for k in rng.choice(3, rows, p=[0.7, 0.15, 0.15])]
    labelled = np.array([s != "test" for s in splits])
    started, cpu = time.perf_counter(), cpu_seconds()
    searched = projected(features, SEARCH_DIMS, params.seed) if rows > EXACT_SEARCH_MAX else features
    unit = unit_rows(searched)
    (votes_index, votes_similarity), (index, similarity) = nearest(
        unit, unit, np.arange(rows), [(params.neighbors, labelled), (NEXT + 1, None)],
        fast_top_k=rows > EXACT_SEARCH_MAX)
    searched_at = time.perf_counter() - started
    components = searched[:, :params.dims] if rows > EXACT_SEARCH_MAX else projected(features, params.dims, 0)
    train = np.flatnonzero(labelled)
    oof = out_of_fold(components[train], labels[train], labels[votes_index[train]], len(images.classes),
                      folds=params.folds, seed=params.seed, C=params.C)
    find_label_issues(oof.probabilities, labels[train], params.rank_by)
    near_copies(index, similarity, splits, params.near_copy_z)
    outliers(votes_similarity, params.outlier_z)
    wall, used = time.perf_counter() - started, cpu_seconds() - cpu
    print(f"\n4. The audit's computation on {rows} rows ({len(train)} train+val), one run: wall {wall:.1f} s "
          f"(the neighbour search {searched_at:.1f} s, on {unit.shape[1]} dimensions), CPU {used:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", type=int, default=70_000, help="rows of the large run (0 skips it)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--large-only", action="store_true", help="only the large run (4.)")
    args = parser.parse_args()
    os.chdir(REPO)
    params = AuditParams.model_validate(yaml.safe_load(Path("params.yaml").read_text()).get("audit", {}))
    images = read_images()
    if not args.large_only:
        label_issues(images, params)
        leaks(images, params)
        stage_timing(args.reps)
    if args.large:
        large(args.large, images, params)


if __name__ == "__main__":
    main()
