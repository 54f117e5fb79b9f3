"""extract.engine: ray vs local, each figure measured in this one run (these machines are noisy).

    python benchmarks/ray_vs_local.py [--per-class 30] [--reps 5] [--actors 2]

1. cold-store extract wall time (the whole stage process, Ray's start-up included), ray / local  (target <= 1.5)
2. Ray's start-up (to the first rows back) and rows/s per actor after it, from metrics/extract.json
3. the driver's store-write rate: rows/s that store.add + commit absorb, on precomputed rows (the single writer
   every actor's rows go through)
Temporary project on the built-in Fashion-MNIST, MobileNetV2 @224 with IMAGENET1K_V1, CPU. The default data is 300
per class (3000 images: `--per-class 300`, about 5 minutes on 2 cores); by default each rep extracts --per-class 30
(300 images, about 3 minutes in all) and the 3000-image wall times are estimated from the measured fixed costs and
rates.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from timing import ratio_line, repeat  # noqa: E402
from stage_process import run_stage  # noqa: E402

DEFAULT_IMAGES = 3000


def set_params(project: Path, per_class: int, engine: str = "local", actors: int = 2) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["per_class"] = per_class
    params["extract"]["providers"] = ["CPUExecutionProvider"]
    params["extract"]["engine"] = engine
    params["extract"].setdefault("ray", {})["actors"] = actors
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def cold_extract(project: Path, per_class: int, engine: str, actors: int) -> dict:
    """One extract stage process on an empty store; returns its metrics."""
    shutil.rmtree(project / "data/feature-store", ignore_errors=True)
    set_params(project, per_class, engine, actors)
    run_stage(project, "extract")
    metrics = json.loads((project / "metrics/extract.json").read_text())
    assert metrics["engine"] == engine and metrics["reused"] == 0, metrics
    return metrics


def store_write_rows_per_s(feature_dim: int, rows: int = DEFAULT_IMAGES, batch: int = 64) -> tuple[float, object]:
    """store.add in batches + the commits it triggers + the final commit, on rows already computed."""
    from transfer_learning.features.store import FeatureStore

    features = np.random.default_rng(0).random((rows, feature_dim), dtype=np.float32)
    keys = [f"{i:064x}/0" for i in range(rows)]

    def write() -> None:
        with tempfile.TemporaryDirectory(prefix="store-bench-") as root:
            with FeatureStore(root, "f" * 64, feature_dim) as store:
                for start in range(0, rows, batch):
                    store.add(keys[start:start + batch], features[start:start + batch])

    timing = repeat(write, reps=5, warmup=1)
    return timing.rate(rows), timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=30, help="images per class in each rep (10 classes)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ray-bench-") as tmp:
        project = Path(tmp)
        set_params(project, args.per_class)
        for stage in ("prepare", "download", "export"):
            run_stage(project, stage)
        seen: dict[str, list[dict]] = {"local": [], "ray": []}

        def side(engine: str):
            return lambda: seen[engine].append(cold_extract(project, args.per_class, engine, args.actors))

        side("local")()  # one warm-up for both sides: page cache, model file
        side("ray")()
        local = repeat(side("local"), reps=args.reps, warmup=0)
        ray = repeat(side("ray"), reps=args.reps, warmup=0)

    images = seen["local"][-1]["images"]
    feature_dim = seen["local"][-1]["feature_dim"]
    ray_runs = seen["ray"][1:]
    startup = float(np.median([m["ray_startup_seconds"] for m in ray_runs]))
    per_actor = float(np.median([m["rows_per_s_per_actor"] for m in ray_runs]))
    local_rate = float(np.median([m["images_per_s"] for m in seen["local"][1:]]))
    write_rate, write_timing = store_write_rows_per_s(feature_dim)

    print(f"{images} images per rep ({args.per_class} per class), {args.reps} reps per side, CPU, "
          f"{os.cpu_count()} cores, ray: {args.actors} actors, address local (in-process cluster)")
    print(ratio_line("ray / local wall time (cold store, stage process, start-up included)",
                     ray.median / local.median, ray, local), " target <= 1.5")
    print(f"ray start-up to first rows: {startup:.1f} s; an actor's busy rate (decode + ONNX Runtime) "
          f"{per_actor:.1f} rows/s; local compute phase {local_rate:.1f} rows/s (decoding included)")
    # the pipeline's rate after start-up (readers included), not the actors' busy rate: what a longer run adds
    ray_rate = float(np.median([m["computed"] / max(m["compute_seconds"] - m["ray_startup_seconds"], 1e-3)
                                for m in ray_runs]))
    local_fixed = local.median - images / local_rate
    ray_fixed = ray.median - images / ray_rate
    est_local = local_fixed + DEFAULT_IMAGES / local_rate
    est_ray = ray_fixed + DEFAULT_IMAGES / ray_rate
    estimate = (f"estimate for the default {DEFAULT_IMAGES} images: ray {est_ray:.0f} s / local {est_local:.0f} s "
                f"= {est_ray / est_local:.2f}; " if images != DEFAULT_IMAGES else "")
    print(f"{estimate}fixed costs ray {ray_fixed:.1f} s, local {local_fixed:.1f} s; ray pipeline {ray_rate:.1f} "
          "rows/s after start-up")
    print(f"driver store writes: {write_rate:,.0f} rows/s of {feature_dim} float32 (store.add + commits; "
          f"{write_timing}) = the ceiling for every actor together, "
          f"{write_rate / per_actor:,.0f} actors at the measured per-actor rate")


if __name__ == "__main__":
    main()
