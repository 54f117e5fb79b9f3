"""extract.engine: ray vs local, each figure measured in this one run (these machines are noisy).

    python benchmarks/ray_vs_local.py [--per-class 30] [--reps 5] [--pools default,1x2,2x0.5]

1. cold-store extract wall time (the whole stage process, Ray's start-up included), ray / local  (target <= 1.5),
   for each Ray pool shape asked (`default`: params.yaml's extract.ray; `AxC`: A actors of num_cpus_per_actor C,
   i.e. round(C) ONNX Runtime threads each); the repetitions of every side taken in turn (A B C A B C ...)
2. Ray's start-up (to the first rows back) and rows/s per actor after it, from reports/timings/extract.json
3. the driver's store-write rate: rows/s that store.add + commit absorb, on precomputed rows (the single writer
   every actor's rows go through)
Temporary project on the built-in Fashion-MNIST, MobileNetV2 @224 with IMAGENET1K_V1, CPU. The default data is 300
per class (3000 images: `--per-class 300`, about 8 minutes on 2 cores with one pool); by default each rep extracts
--per-class 30 (300 images, about 3 minutes in all) and the 3000-image wall times are estimated from the measured
fixed costs and rates.
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

from timing import interleaved, ratio_line, repeat  # noqa: E402
from stage_process import run_stage  # noqa: E402

DEFAULT_IMAGES = 3000


def set_params(project: Path, per_class: int, engine: str = "local", pool: str = "default") -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["per_class"] = per_class
    params["extract"]["providers"] = ["CPUExecutionProvider"]
    params["extract"]["engine"] = engine
    if pool != "default":
        actors, cpus = pool.split("x")
        params["extract"].setdefault("ray", {}).update(actors=int(actors), num_cpus_per_actor=float(cpus))
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def cold_extract(project: Path, per_class: int, engine: str, pool: str) -> dict:
    """One extract stage process on an empty store; returns its metrics."""
    shutil.rmtree(project / "data/feature-store", ignore_errors=True)
    set_params(project, per_class, engine, pool)
    run_stage(project, "extract")
    metrics = {**json.loads((project / "metrics/extract.json").read_text()),
               **json.loads((project / "reports/timings/extract.json").read_text())}
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
    parser.add_argument("--pools", default="default",
                        help="Ray pool shapes, comma-separated: default (params.yaml) or AxC (A actors x C CPUs)")
    args = parser.parse_args()
    pools = args.pools.split(",")

    with tempfile.TemporaryDirectory(prefix="ray-bench-") as tmp:
        project = Path(tmp)
        set_params(project, args.per_class)
        for stage in ("prepare", "download", "export"):
            run_stage(project, stage)
        seen: dict[str, list[dict]] = {"local": [], **{pool: [] for pool in pools}}

        def side(engine: str, pool: str = "default"):
            return lambda: seen[pool if engine == "ray" else "local"].append(
                cold_extract(project, args.per_class, engine, pool))

        # one warm-up per side (page cache, model file), then the sides in turn
        timings = interleaved({"local": side("local"), **{pool: side("ray", pool) for pool in pools}},
                              reps=args.reps, warmup=1)

    images = seen["local"][-1]["images"]
    feature_dim = seen["local"][-1]["feature_dim"]
    local = timings["local"]
    local_rate = float(np.median([m["images_per_s"] for m in seen["local"][1:]]))
    local_fixed = local.median - images / local_rate
    print(f"{images} images per rep ({args.per_class} per class), {args.reps} reps per side, CPU, "
          f"{os.cpu_count()} cores, address local (in-process cluster); local: compute phase {local_rate:.1f} rows/s "
          f"(decoding included), fixed costs {local_fixed:.1f} s")
    per_actor_rates = []
    for pool in pools:
        ray, ray_runs = timings[pool], seen[pool][1:]
        actors = ray_runs[-1]["actors"]
        startup = float(np.median([m["ray_startup_seconds"] for m in ray_runs]))
        per_actor = float(np.median([m["rows_per_s_per_actor"] for m in ray_runs]))
        per_actor_rates.append(per_actor)
        # the pipeline's rate after start-up, not the actors' busy rate: what a longer run adds
        ray_rate = float(np.median([m["computed"] / max(m["compute_seconds"] - m["ray_startup_seconds"], 1e-3)
                                    for m in ray_runs]))
        ray_fixed = ray.median - images / ray_rate
        print(ratio_line(f"ray [{pool}: {actors} actor(s)] / local wall time (cold store, stage process, start-up "
                         "included)", ray.median / local.median, ray, local), " target <= 1.5")
        est_local, est_ray = local_fixed + DEFAULT_IMAGES / local_rate, ray_fixed + DEFAULT_IMAGES / ray_rate
        estimate = (f"; estimate for the default {DEFAULT_IMAGES} images: ray {est_ray:.0f} s / local "
                    f"{est_local:.0f} s = {est_ray / est_local:.2f}" if images != DEFAULT_IMAGES else "")
        print(f"  start-up to first rows {startup:.1f} s, fixed costs {ray_fixed:.1f} s, then {ray_rate:.1f} rows/s; "
              f"an actor's busy rate (decode + ONNX Runtime) {per_actor:.1f} rows/s{estimate}")
    write_rate, write_timing = store_write_rows_per_s(feature_dim)
    print(f"driver store writes: {write_rate:,.0f} rows/s of {feature_dim} float32 (store.add + commits; "
          f"{write_timing}) = the ceiling for every actor together, "
          f"{write_rate / max(per_actor_rates):,.0f} actors at the best measured per-actor rate")


if __name__ == "__main__":
    main()
