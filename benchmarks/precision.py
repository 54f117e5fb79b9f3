"""extract.precision: fp32 vs int8 side by side, measured in this one run (these machines are noisy).

    python benchmarks/precision.py [--per-class 300] [--images 640] [--reps 5]

In a temporary project on the default data (Fashion-MNIST, --per-class × 10 images, MobileNetV2 @224 with the
IMAGENET1K_V1 weights, CPU forced), the extract stage runs once at fp32 and once at int8 (which calibrates and caches
the quantized model). Then, for both models on identical inputs (warm-up excluded, --reps repetitions, median and
spread, benchmarks/timing.py):
1. bare ONNX Runtime images/s: one pre-decoded, normalized batch of 64 real images, run 4 times per repetition;
2. end-to-end images/s: extract's own compute loop (decode, resize, normalize in 2 worker processes, ORT, the
   store) over the first --images train images into a fresh store each repetition;
3. preprocessing alone images/s: the same DataLoader and normalization without ORT (what end to end is bounded by);
4. the logistic head on each precision's features (fitted on train, C from params.yaml's heads.logreg.C chosen on
   val): val and test accuracy, and on the same val images how many only int8 / only fp32 gets right (the
   difference's standard error); and how close the int8 rows are to the fp32 rows of the same val images (mean and
   lowest cosine similarity, mean relative error |int8 - fp32| / |fp32|). The int8 recipe was chosen on val and
   on these fidelity figures, never on test.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from timing import interleaved, repeat  # noqa: E402
from stage_process import run_stage  # noqa: E402

BATCH = 64


def set_params(project: Path, per_class: int, precision: str) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["per_class"] = per_class
    params["extract"]["providers"] = ["CPUExecutionProvider"]
    params["extract"]["precision"] = precision
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def logistic_head() -> dict:
    """LogisticRegression on standardized train features, C (params.yaml's heads.logreg.C) chosen on val:
    {val, test, C} and the val features (in val's order, for the fidelity comparison)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from transfer_learning.features.split_files import read_split

    train, val, test = (read_split(split) for split in ("train", "val", "test"))
    scaler = StandardScaler().fit(train.features)
    best: dict = {}
    for C in yaml.safe_load(Path("params.yaml").read_text())["heads"]["logreg"]["C"]:
        head = LogisticRegression(C=C, max_iter=2000).fit(scaler.transform(train.features), train.labels)
        val_right = head.predict(scaler.transform(val.features)) == val.labels
        if not best or val_right.mean() > best["val"]:
            best = {"val": val_right.mean(), "val_right": val_right, "C": C,
                    "test": head.score(scaler.transform(test.features), test.labels)}
    return best | {"val_features": val.features, "test_images": len(test.labels)}


def fidelity(fp32: np.ndarray, int8: np.ndarray) -> dict:
    """How close int8 rows are to the fp32 rows of the same images."""
    cosine = np.sum(fp32 * int8, 1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(int8, axis=1)
    relative = np.linalg.norm(int8 - fp32, axis=1) / np.linalg.norm(fp32, axis=1)
    return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
            "relative_error": float(relative.mean())}


def paired(fp32_right: np.ndarray, int8_right: np.ndarray) -> str:
    """The accuracy difference as the images behind it: on the same images, those only int8 gets right and those
    only fp32 gets right, and the difference's standard error sqrt(discordant) / n (McNemar): an int8 recipe is
    better or worse only by more than about twice that."""
    only_int8, only_fp32 = int(np.sum(int8_right & ~fp32_right)), int(np.sum(fp32_right & ~int8_right))
    return (f"same images: {only_int8} right only at int8, {only_fp32} right only at fp32; standard error of the "
            f"difference {100 * np.sqrt(only_int8 + only_fp32) / len(fp32_right):.2f} points")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=300, help="300 = the default data (3000 images)")
    parser.add_argument("--images", type=int, default=640, help="train images per end-to-end repetition")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="precision-bench-") as tmp:
        project = Path(tmp)
        os.chdir(project)
        set_params(project, args.per_class, "fp32")
        for stage in ("prepare", "download", "export"):
            run_stage(project, stage)
        results: dict[str, dict] = {}
        for precision in ("fp32", "int8"):
            set_params(project, args.per_class, precision)
            run_stage(project, "extract")
            metrics = {**json.loads(Path("metrics/extract.json").read_text()),
                       **json.loads(Path("reports/timings/extract.json").read_text())}
            results[precision] = {"metrics": metrics, **logistic_head()}
        report(project, results, args)


def report(project: Path, results: dict, args) -> None:
    import torch

    from transfer_learning.backbone import files as backbone_files
    from transfer_learning.data import manifest
    from transfer_learning.data.pixels import NormalizeTable
    from transfer_learning.features import quantize
    from transfer_learning.features.extract import compute
    from transfer_learning.features.runtime import FeatureRunner
    from transfer_learning.features.store import FeatureStore, store_key
    from transfer_learning.features.views import ViewDataset, ViewRequest, collate, one_thread_worker
    from transfer_learning.params import load_params
    from torch.utils.data import DataLoader

    params = load_params(resolve_estimators=False, resolve_backbone=False).extract  # int8, as the last run left it
    rows = manifest.read()
    preprocessing = backbone_files.load().preprocessing.with_bit_depth(manifest.read_bit_depth())
    fp32_bytes = backbone_files.ONNX.read_bytes()
    models = {"fp32": fp32_bytes,
              "int8": quantize.backbone_at_precision(params, fp32_bytes, rows, preprocessing)}  # the cached one
    runners = {name: FeatureRunner(data, ["CPUExecutionProvider"], BATCH) for name, data in models.items()}

    train = [row for row in rows if row.split == "train"][:args.images]
    todo = {store_key(row.sha256, "0"): ViewRequest(row.path, row.sha256, 0) for row in train}
    pixels = torch.stack([ViewDataset(list(todo.values())[:BATCH], preprocessing)[i][0] for i in range(BATCH)])
    batch = NormalizeTable.of(preprocessing)(pixels.numpy(), np.empty((BATCH, *pixels.shape[1:]), np.float32))

    # repetitions of the two sides taken in turn (fp32 int8 fp32 int8 ...): a load that comes and goes hits both
    bare = interleaved({name: lambda r=runner: [r(batch) for _ in range(4)] for name, runner in runners.items()},
                       reps=args.reps)
    stores = tempfile.mkdtemp(prefix="e2e-", dir=project)
    counter = iter(range(10**6))

    def end_to_end(runner) -> None:
        with FeatureStore(Path(stores) / f"rep{next(counter)}", f"{0:064d}", runner.feature_dim) as store:
            compute(store, todo, runner, preprocessing, BATCH, params.workers)

    e2e = interleaved({name: lambda r=runner: end_to_end(r) for name, runner in runners.items()}, reps=args.reps)
    normalize = NormalizeTable.of(preprocessing)
    out = np.empty((BATCH, 3, preprocessing.crop, preprocessing.crop), np.float32)

    def preprocess_only() -> None:
        loader = DataLoader(ViewDataset(list(todo.values()), preprocessing, grey_planes=True), batch_size=BATCH,
                            num_workers=params.workers, collate_fn=collate, worker_init_fn=one_thread_worker,
                            prefetch_factor=4 if params.workers else None)
        for pixels_batch, _, _ in loader:
            normalize(pixels_batch.numpy(), out)

    preprocessing_only = repeat(preprocess_only, reps=args.reps)

    n_bare, n = 4 * BATCH, len(todo)
    print(f"CPU, {os.cpu_count()} cores; {results['fp32']['metrics']['images']} images (Fashion-MNIST, MobileNetV2 "
          f"@{preprocessing.crop}); bare ORT: batch {BATCH} x4 per rep; end to end: {n} train images per rep, "
          f"{params.workers} workers; {args.reps} reps, 1 warm-up")
    for name in ("fp32", "int8"):
        print(f"{name}: bare ORT {bare[name].rate(n_bare):6.1f} img/s [{bare[name]}]")
        print(f"{name}: end to end {e2e[name].rate(n):6.1f} img/s [{e2e[name]}]")
    print(f"preprocessing alone (decode+resize+normalize, no ORT): {preprocessing_only.rate(n):6.1f} img/s "
          f"[{preprocessing_only}]")
    print(f"int8/fp32 bare ORT   = {bare['fp32'].median / bare['int8'].median:5.2f}")
    print(f"int8/fp32 end to end = {e2e['fp32'].median / e2e['int8'].median:5.2f}  (target >= 1.8)")
    print(f"int8 end to end / preprocessing alone = {preprocessing_only.median / e2e['int8'].median:5.2f}  "
          "(1.0 = preprocessing-bound)")
    for name in ("fp32", "int8"):
        r = results[name]
        print(f"{name}: logistic head val {100 * r['val']:.2f} %, test {100 * r['test']:.2f} % (C={r['C']} chosen on "
              f"val); extract stage {r['metrics']['images_per_s']} img/s over {r['metrics']['computed']} images")
    close = fidelity(results["fp32"]["val_features"], results["int8"]["val_features"])
    print(f"int8 vs fp32 rows of the {len(results['fp32']['val_features'])} val images: cosine mean "
          f"{close['cosine_mean']:.4f}, min {close['cosine_min']:.4f}; "
          f"relative error mean {close['relative_error']:.3f}")
    print(f"val accuracy int8 - fp32 = {100 * (results['int8']['val'] - results['fp32']['val']):+.2f} points "
          f"({paired(results['fp32']['val_right'], results['int8']['val_right'])})")
    print(f"test accuracy int8 - fp32 = {100 * (results['int8']['test'] - results['fp32']['test']):+.2f} points "
          f"(target within 0.5; {results['fp32']['test_images']} test images: one image is "
          f"{100 / results['fp32']['test_images']:.2f} points)")


if __name__ == "__main__":
    main()
