"""Training every default head on cached features vs extracting those features, measured in one run.

    python benchmarks/heads_vs_extract.py [--train-rows 1400] [--reps 5]

In a temporary project on the built-in Fashion-MNIST (MobileNetV2 at 224, CPU forced on both sides): prepare enough
images for --train-rows train rows and extract them once. Then, on the same train rows, --reps repetitions of each
side after 1 warm-up, taken in turn:
    heads:   `python -m stages.train_heads` (every head of params.yaml's `heads`; the whole process, imports included)
    extract: extract's compute path over the train images (workers, ONNX Runtime, store writes) into an empty store
Prints the ratio heads / extract (target: below 1 — the heads cost less than the features they are trained on;
the heads side also pays its process start-up, the extract side does not) and each head's own seconds (median).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_throughput import BATCH, CPU, run_stage, set_params  # noqa: E402
from timing import interleaved, ratio_line  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-rows", type=int, default=1400)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the heads' torch training on the CPU too, like extract's side
    train_fraction = 0.7  # params.yaml's val_fraction + test_fraction = 0.3
    per_class = math.ceil(args.train_rows / train_fraction / 10)

    from contextlib import chdir

    from transfer_learning.backbone import files as backbone_files
    from transfer_learning.data import manifest
    from transfer_learning.features.extract import compute
    from transfer_learning.features.runtime import FeatureRunner
    from transfer_learning.features.store import FeatureStore, store_key
    from transfer_learning.features.views import ViewRequest

    with tempfile.TemporaryDirectory(prefix="heads-bench-") as tmp:
        project = Path(tmp)
        set_params(project, per_class)
        for stage in ("prepare", "download", "export", "extract"):
            run_stage(project, stage)
        with chdir(project):
            train = [row for row in manifest.read() if row.split == "train"]
            preprocessing = backbone_files.load().preprocessing.with_bit_depth(manifest.read_bit_depth())
            runner = FeatureRunner(backbone_files.ONNX.read_bytes(), [CPU], BATCH)
        todo = {store_key(row.sha256, "0"): ViewRequest(str(project / row.path), row.sha256, 0) for row in train}
        stores = iter(range(1 << 30))

        def extract_train_rows() -> None:
            with FeatureStore(project / f"bench-store-{next(stores)}", "0" * 64, runner.feature_dim) as store:
                compute(store, todo, runner, preprocessing, BATCH, workers=2)
                store.commit()

        records: list[dict] = []

        def train_heads() -> None:
            run_stage(project, "train_heads")
            records.append({name.stem: {**json.loads(name.read_text()),
                                        **json.loads((project / "reports/timings/heads" / name.name).read_text())}
                            for name in sorted((project / "metrics/heads").glob("*.json"))})

        timings = interleaved({"heads": train_heads, "extract": extract_train_rows}, reps=args.reps)

    heads, extract = timings["heads"], timings["extract"]
    records = records[1:]  # the warm-up's
    rows = next(iter(records[0].values()))["train_rows"]
    assert rows == len(todo), (rows, len(todo))
    print(f"{rows} train rows x {runner.feature_dim} features, CPU, {args.reps} repetitions after 1 warm-up")
    print(f"  extract's compute path for them: {extract}  ({extract.rate(rows):.1f} img/s)")
    print(f"  train_heads, whole stage:        {heads}")
    for name in records[0]:
        seconds = statistics.median(r[name]["train_seconds"] for r in records)
        head = records[-1][name]
        print(f"    {name:8s} {head['type']:8s} {seconds:7.1f} s (median)  val accuracy {head['val_accuracy']:.4f}  "
              f"{head['params']}")
    print(ratio_line("train_heads / extracting the train rows (target < 1)", heads.median / extract.median,
                     heads, extract))


if __name__ == "__main__":
    main()
