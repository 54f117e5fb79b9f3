"""The layer sweep's cost against one ordinary extraction, both sides measured in this one run.

    python benchmarks/layer_sweep.py [--images 384] [--reps 5] [--per-class 300]

In a temporary project on the built-in Fashion-MNIST (MobileNetV2 @ 224, offline IMAGENET1K_V1 weights, CPU forced
on both sides, batch 64, extract.workers 2):
1. one pass of the sweep graph (a pooled output per block, every block of meta.json) over --images images into a
   fresh store per block, vs one ordinary extract compute pass (models/backbone.onnx, backbone.cut: penultimate)
   over the same images into a fresh store: --reps repetitions in turn after 1 warm-up. Target: <= 1.5.
   (A full 3,000-image sweep per repetition would take minutes; the pass scales linearly with the images.)
2. one-off, once each: the sweep graph's export vs the ordinary export, and the logistic heads of every block on
   the project's train/val rows (--per-class x 10 images, the default data), C grid of params.yaml `layers.C`.
   The whole sweep = export + pass over all images + heads; its ratio to export + ordinary extract is printed with
   the pass extrapolated from comparison 1's medians (the stage's own figures are in metrics/layers.json).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from contextlib import chdir
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_throughput import run_stage  # noqa: E402
from timing import interleaved, ratio_line  # noqa: E402

CPU = "CPUExecutionProvider"
BATCH = 64


def set_params(project: Path, per_class: int) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["per_class"] = per_class
    params["extract"].update(providers=[CPU], batch_size=BATCH)
    params["layers"].update(enabled=True, blocks="all")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=384, help="images per repetition in comparison 1")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=300, help="the project's size (heads, extrapolation)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="layers-bench-") as tmp:
        project = Path(tmp)
        params = set_params(project, args.per_class)
        for stage in ("prepare", "download"):
            run_stage(project, stage)
        with chdir(project):
            figures = measure(project, params, args.images, args.reps)
    (ordinary, swept), n, total_images, one_off = figures
    print(f"CPU ({os.cpu_count()} cores), MobileNetV2 @ 224, batch {BATCH}, extract.workers "
          f"{params['extract']['workers']}; comparison 1 on the same {n} Fashion-MNIST images per repetition, "
          f"{args.reps} repetitions after 1 warm-up, taken in turn")
    print(f"  ordinary extract pass   {ordinary.rate(n):6.1f} img/s  {ordinary}")
    print(f"  sweep pass ({one_off['blocks']} blocks) {swept.rate(n):6.1f} img/s  {swept}")
    print(ratio_line("sweep pass / ordinary extract pass (target <= 1.5)", swept.median / ordinary.median,
                     swept, ordinary))
    print(f"  one-off: sweep graph export {one_off['sweep_export']:.1f} s, ordinary export "
          f"{one_off['ordinary_export']:.1f} s; logistic heads of {one_off['blocks']} blocks on "
          f"{one_off['train_rows']} train / {one_off['val_rows']} val rows, C grid {one_off['C']}: "
          f"{one_off['heads']:.1f} s (slowest block {one_off['slowest']})")
    per_image = (swept.median / n, ordinary.median / n)
    whole = one_off["sweep_export"] + per_image[0] * total_images + one_off["heads"]
    base = one_off["ordinary_export"] + per_image[1] * total_images
    print(f"  whole sweep on {total_images} images (pass extrapolated): {whole:.1f} s vs export + extract "
          f"{base:.1f} s: {whole / base:.2f}x; without the heads {(whole - one_off['heads']) / base:.2f}x")


def measure(project: Path, params: dict, images: int, reps: int):
    from transfer_learning.backbone import files as backbone_files
    from transfer_learning.backbone.export import export_backbone
    from transfer_learning.data import manifest
    from transfer_learning.features.extract import compute
    from transfer_learning.features.runtime import FeatureRunner
    from transfer_learning.features.store import FeatureStore, store_key
    from transfer_learning.features.views import ViewRequest
    from transfer_learning.layers import graph
    from transfer_learning.layers.blocks import chosen_blocks
    from transfer_learning.layers.sweep import BlockStores, fit_blocks, split_features
    from transfer_learning.params import LogisticHead, load_params

    started = time.perf_counter()
    settings = load_params()
    export_backbone(settings.backbone, settings.export)
    ordinary_export = time.perf_counter() - started
    backbone = backbone_files.load()
    blocks = chosen_blocks("all", backbone.anatomy)
    started = time.perf_counter()
    sweep_onnx = graph.blocks_onnx(backbone, blocks, params["backbone"]["pool"], params["export"]["opset"])
    sweep_export = time.perf_counter() - started

    rows = manifest.read()
    preprocessing = backbone.preprocessing.with_bit_depth(manifest.read_bit_depth())
    todo = {store_key(r.sha256, "0"): ViewRequest(r.path, r.sha256, 0) for r in rows[:images]}
    ordinary_runner = FeatureRunner(backbone_files.ONNX.read_bytes(), [CPU], BATCH)
    sweep_runner = graph.BlocksRunner(sweep_onnx, [CPU], BATCH)
    dims = sweep_runner.dims(preprocessing.crop)
    workers = params["extract"]["workers"]
    stores = project / "bench-stores"

    def fresh() -> Path:
        shutil.rmtree(stores, ignore_errors=True)
        return stores

    def ordinary() -> None:
        with FeatureStore(fresh(), "0" * 64, ordinary_runner.feature_dim) as store:
            compute(store, todo, ordinary_runner, preprocessing, BATCH, workers)

    def swept() -> None:
        root = fresh()
        opened = [FeatureStore(root, f"{i:064x}", dim) for i, dim in enumerate(dims)]
        for store in opened:
            store.__enter__()
        try:
            compute(BlockStores(opened), todo, sweep_runner, preprocessing, BATCH, workers)
        finally:
            for store in opened:
                store.__exit__(None, None, None)

    timings = interleaved({"ordinary": ordinary, "swept": swept}, reps=reps)

    # heads: every block's rows of the whole project, computed once
    everything = {store_key(r.sha256, "0"): ViewRequest(r.path, r.sha256, 0) for r in rows}
    root = fresh()
    opened = [FeatureStore(root, f"{i:064x}", dim).__enter__() for i, dim in enumerate(dims)]
    compute(BlockStores(opened), everything, sweep_runner, preprocessing, BATCH, workers)
    classes = manifest.read_classes()
    index = {label: i for i, label in enumerate(classes)}
    split = {s: ([store_key(r.sha256, "0") for r in rows if r.split == s],
                 [index[r.label] for r in rows if r.split == s]) for s in ("train", "val")}
    head = LogisticHead(type="logistic", C=list(params["layers"]["C"]))
    for store in opened:
        store.commit()
    started = time.perf_counter()
    fitted = fit_blocks(head, [(f"block {block.number}", *(split_features(store, *split[s], classes)
                                                           for s in ("train", "val")))
                               for block, store in zip(blocks, opened)])
    heads = time.perf_counter() - started  # the blocks in parallel, one process per core, as the stage fits them
    for store in opened:
        store.__exit__(None, None, None)
    seconds = {block.number: f.seconds for block, f in zip(blocks, fitted)}
    slowest = max(seconds, key=seconds.get)
    one_off = {"sweep_export": sweep_export, "ordinary_export": ordinary_export, "heads": heads,
               "blocks": len(blocks), "train_rows": len(split["train"][0]), "val_rows": len(split["val"][0]),
               "C": head.C, "slowest": f"{slowest}: {seconds[slowest]:.1f} s"}
    return (timings["ordinary"], timings["swept"]), len(todo), len(rows), one_off


if __name__ == "__main__":
    main()
