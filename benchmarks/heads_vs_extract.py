"""Training every default head on cached features vs extracting those features, measured in one run.

    python benchmarks/heads_vs_extract.py [--train-rows 10000]

In a temporary project on the built-in Fashion-MNIST (MobileNetV2 at 224, CPU): prepare enough images for
`--train-rows` train rows, extract them cold (empty feature store), then run train_heads with the default
`heads` of params.yaml. Prints the seconds of each and the ratio
    train_heads seconds / seconds extract spent computing the train rows' features
(target: below 1 — a head costs less than the features it is trained on), and each head's own seconds.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_throughput import run_stage, set_params  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-rows", type=int, default=10_000)
    args = parser.parse_args()
    train_fraction = 0.7  # params.yaml's val_fraction + test_fraction = 0.3
    per_class = math.ceil(args.train_rows / train_fraction / 10)

    with tempfile.TemporaryDirectory(prefix="heads-bench-") as tmp:
        project = Path(tmp)
        set_params(project, per_class)
        for stage in ("prepare", "download", "export"):
            run_stage(project, stage)
        run_stage(project, "extract")
        extract = json.loads((project / "metrics/extract.json").read_text())
        heads_seconds, heads_rss = run_stage(project, "train_heads")
        heads = json.loads((project / "metrics/heads.json").read_text())

    train_rows = next(iter(heads.values()))["train_rows"]
    extract_train_seconds = train_rows / extract["images_per_s"]
    print(f"images {extract['images']}, train rows {train_rows} × {extract['feature_dim']} features")
    print(f"extract (cold, {extract['images_per_s']} img/s): {extract['compute_seconds']:.1f} s for all images, "
          f"{extract_train_seconds:.1f} s for the train rows")
    print(f"train_heads (whole stage, imports included): {heads_seconds:.1f} s, peak RSS {heads_rss} MB")
    for name, head in heads.items():
        print(f"  {name:8s} {head['type']:8s} {head['train_seconds']:7.1f} s  val accuracy {head['val_accuracy']:.4f}"
              f"  {head['params']}")
    print(f"ratio train_heads / extracting the train rows: {heads_seconds / extract_train_seconds:.2f} (target < 1)")


if __name__ == "__main__":
    main()
