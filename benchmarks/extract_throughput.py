"""Extract speed and memory, each figure a ratio measured in this one run (these machines are noisy).

    python benchmarks/extract_throughput.py [--per-class 300] [--big-per-class 2000] [--baseline-images 512]

1. end-to-end extract images/s  vs  a plain torch eager loop (torchvision model, DataLoader, inference_mode)
2. end-to-end extract images/s  vs  ONNX Runtime alone on pre-decoded tensors
3. +10 % new images: extract seconds vs the cold run
4. peak RSS of extract for big-per-class×10 images vs per-class×10 images
5. store bytes per row vs feature_dim × dtype size
Runs in a temporary project on the built-in Fashion-MNIST at the weights' 224 px, MobileNetV2, CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_stage(project: Path, stage: str) -> tuple[float, int]:
    """Runs `python -m stages.<stage>` in `project`; returns (seconds, peak RSS in MB of its main process)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", f"stages.{stage}"], cwd=project, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"stages.{stage} failed in {project}:\n{process.stderr.read()}")
    return seconds, usage.ru_maxrss // 1024


def set_params(project: Path, per_class: int) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["per_class"] = per_class
    params["extract"]["providers"] = ["CPUExecutionProvider"]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def extract_metrics(project: Path) -> dict:
    return json.loads((project / "metrics" / "extract.json").read_text())


def torch_eager_images_per_s(paths: list[str]) -> float:
    """What a user would write: torchvision model + weights.transforms() + DataLoader + inference_mode."""
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

    weights = MobileNet_V2_Weights.IMAGENET1K_V1
    model = mobilenet_v2(weights=weights).eval()
    model.classifier = torch.nn.Identity()
    transform = weights.transforms()

    class Images(Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return transform(Image.open(paths[i]).convert("RGB"))

    loader = DataLoader(Images(), batch_size=64, num_workers=2)
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            model(batch)
    return len(paths) / (time.perf_counter() - started)


def ort_model_only_images_per_s(onnx_path: Path, batches: int = 8, batch_size: int = 64) -> float:
    """ONNX Runtime with its default options on one pre-decoded batch, over and over."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    batch = np.random.default_rng(0).standard_normal((batch_size, 3, 224, 224), dtype=np.float32)
    session.run(None, {name: batch})  # warm-up
    started = time.perf_counter()
    for _ in range(batches):
        session.run(None, {name: batch})
    return batches * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=300, help="300 = the default data")
    parser.add_argument("--big-per-class", type=int, default=2000)
    parser.add_argument("--baseline-images", type=int, default=512)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="extract-bench-") as tmp:
        project = Path(tmp)
        set_params(project, args.per_class)
        for stage in ("prepare", "download", "export"):
            run_stage(project, stage)
        cold_seconds, small_rss = run_stage(project, "extract")
        cold = extract_metrics(project)
        n = cold["images"]
        e2e = n / cold["compute_seconds"]

        manifest = (project / "data/prepared/manifest.csv").read_text().splitlines()[1:]
        paths = [str(project / line.split(",")[0]) for line in manifest[:args.baseline_images]]
        eager = torch_eager_images_per_s(paths)
        ort_only = ort_model_only_images_per_s(project / "models/backbone.onnx")

        set_params(project, int(args.per_class * 1.1))
        run_stage(project, "prepare")
        more_seconds, _ = run_stage(project, "extract")
        more = extract_metrics(project)

        store_files = list((project / "data/feature-store").glob("*/*.h5"))
        store_bytes = sum(f.stat().st_size for f in store_files)
        bytes_per_row = store_bytes / more["store_rows"]

        shutil.rmtree(project / "data/feature-store")
        set_params(project, args.big_per_class)
        run_stage(project, "prepare")
        _, big_rss = run_stage(project, "extract")
        big = extract_metrics(project)

    print(f"images: {n} cold, +{more['computed']} new; {big['images']} for the memory run; CPU, "
          f"{os.cpu_count()} cores")
    print(f"end-to-end extract      {e2e:7.1f} img/s (compute phase; {n / cold_seconds:.1f} img/s with start-up)")
    print(f"torch eager + DataLoader {eager:6.1f} img/s   ratio extract/eager     = {e2e / eager:5.2f}  (target >= 3)")
    print(f"ORT model only          {ort_only:7.1f} img/s   ratio extract/ORT-only  = {e2e / ort_only:5.2f}  (target >= 0.8)")
    print(f"+10% images: {more_seconds:.1f} s vs cold {cold_seconds:.1f} s      ratio = {more_seconds / cold_seconds:5.2f}  "
          f"(target <= 0.25; computed {more['computed']}, reused {more['reused']})")
    print(f"peak RSS: {big['images']} images {big_rss} MB vs {n} images {small_rss} MB   ratio = "
          f"{big_rss / small_rss:5.2f}  (target <= 1.2)")
    print(f"store: {bytes_per_row:.0f} bytes/row vs feature_dim x 4 = {cold['feature_dim'] * 4}   ratio = "
          f"{bytes_per_row / (cold['feature_dim'] * 4):5.3f}")


if __name__ == "__main__":
    main()
