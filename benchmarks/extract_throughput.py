"""Extract speed and memory, each figure a ratio of two sides measured in this one run (these machines are noisy).

    python benchmarks/extract_throughput.py [--images 640] [--reps 5] [--per-class 64] [--big-per-class 500]
                                            [--only-ort]

In a temporary project on the built-in Fashion-MNIST at the weights' 224 px, MobileNetV2, CPU forced everywhere:
1. extract's compute path (DataLoader workers decode + resize, normalize, ONNX Runtime, feature-store
   writes and commit; worker start-up and a new session's first run included, as in the stage; each
   repetition into a new empty store) vs
   a. ONNX Runtime alone (default session options) on the same images, pre-decoded and pre-normalized one
      image at a time (extract's arithmetic), in batches of the same size
   b. the same, on extract's own session (its session options: no spinning threads); the target, >= 0.9, is
      against the faster of a and b
   c. a plain torch eager loop (torchvision model, weights.transforms(), DataLoader, inference_mode)
   Same --images images on every side, one warm-up run excluded from each, --reps repetitions taken in turn.
   Then extract's rows are checked bit for bit against side b's (same images, same session: any difference would
   be a preprocessing difference), and one pass per phase says where the rest of the time goes.
2. +10 % new images: `python -m stages.extract` seconds (whole process; and its compute phase alone) with the
   store holding the other 90 %, vs the same run cold (empty store): --reps repetitions each, in turn.
3. peak RSS of one extract of big-per-class x 10 images vs one of per-class x 1.1 x 10 images (memory, one run each)
4. store bytes per row vs feature_dim x dtype size
--only-ort: comparison 1 without the torch eager side, and nothing else (a quick check of the 0.9).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import chdir
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import Timing, interleaved, ratio_line, repeat  # noqa: E402

CPU = "CPUExecutionProvider"
BATCH = 64


# Linux keeps a process's peak RSS across exec, and a child forked from this (large) process starts with this
# process's pages: the stage is started by a small launcher process, which reports the stage's own peak RSS.
LAUNCHER = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, status, usage = os.wait4(p.pid, 0); "
            "open(sys.argv[1], 'w').write(str(usage.ru_maxrss)); sys.exit(os.waitstatus_to_exitcode(status))")


def run_stage(project: Path, stage: str) -> tuple[float, int]:
    """Runs `python -m stages.<stage>` in `project`; returns (seconds, peak RSS in MB of its main process)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rss_file = project / ".stage-rss"
    started = time.perf_counter()
    process = subprocess.run([sys.executable, "-c", LAUNCHER, str(rss_file), sys.executable, "-m", f"stages.{stage}"],
                             cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"stages.{stage} failed in {project}:\n{process.stderr}")
    return seconds, int(rss_file.read_text()) // 1024


def set_params(project: Path, per_class: int) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["per_class"] = per_class
    params["extract"]["providers"] = [CPU]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def extract_metrics(project: Path) -> dict:
    """metrics/extract.json with the stage's timings (reports/timings/extract.json) beside its fields."""
    return {**json.loads((project / "metrics" / "extract.json").read_text()),
            **json.loads((project / "reports" / "timings" / "extract.json").read_text())}


class TimedRunner:
    """extract's FeatureRunner, adding up the seconds its calls take (ORT inside the loop, on the same session)."""

    def __init__(self, runner):
        self.runner, self.seconds, self.calls = runner, 0.0, []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        try:
            return self.runner(batch)
        finally:
            self.seconds += time.perf_counter() - started
            self.calls.append(time.perf_counter() - started)


class Sides:
    """The sides of comparison 1, all on the same images (the first `count` of the project's manifest)."""

    def __init__(self, project: Path, count: int, reps: int):
        import onnxruntime as ort

        from transfer_learning.backbone import files as backbone_files
        from transfer_learning.data import manifest
        from transfer_learning.features.runtime import FeatureRunner
        from transfer_learning.features.store import store_key
        from transfer_learning.features.views import ViewRequest

        with chdir(project):
            rows = manifest.read()[:count]
            self.backbone = backbone_files.load()
            self.preprocessing = self.backbone.preprocessing.with_bit_depth(manifest.read_bit_depth())
            onnx = backbone_files.ONNX.read_bytes()
        self.paths = [str(project / row.path) for row in rows]
        self.todo = {store_key(row.sha256, "0"): ViewRequest(str(project / row.path), row.sha256, 0) for row in rows}
        self.workers = yaml.safe_load((project / "params.yaml").read_text())["extract"]["workers"]
        # the reference inputs: each image decoded to RGB, resized and normalized on its own (extract's arithmetic;
        # torchvision's ToDtype(scale=True) rounds some values 1 ulp apart from it)
        from PIL import Image
        pixels, normalize = self.preprocessing.pixels(), self.preprocessing.normalize
        # in a shared file mapping, not in this process's anonymous memory: extract's DataLoader forks this process,
        # and a fork copies the page tables of anonymous memory (not of shared mappings), so 1.8 GB of the other
        # side's inputs would make extract's worker start-up and exit slower than in the stage, which holds none
        crop = self.preprocessing.crop
        with tempfile.NamedTemporaryFile(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as backing:
            images = np.lib.format.open_memmap(backing.name, mode="w+", dtype=np.float32,
                                               shape=(len(self.paths), 3, crop, crop))
        for i, path in enumerate(self.paths):
            images[i] = normalize(pixels(Image.open(path).convert("RGB"))[None])[0].numpy()
        self.batches = [images[i:i + BATCH] for i in range(0, len(images), BATCH)]
        self.default_session = ort.InferenceSession(onnx, providers=[CPU])
        self.input_name = self.default_session.get_inputs()[0].name
        self.runner = FeatureRunner(onnx, [CPU], BATCH)
        # the extract side gets a new session each repetition, as the stage does (made here, outside the timing): its
        # DataLoader forks the workers before the session's first run. Forked after a run, ORT's warm buffers would be
        # copy-on-write while the workers live (measured: the first batch 8x slower), which the stage never pays.
        self.fresh_runners = [FeatureRunner(onnx, [CPU], BATCH) for _ in range(reps + 1)]
        self.tmp = Path(tempfile.mkdtemp(prefix="stores-", dir=project))
        self.last_store: Path | None = None
        self.inside_ort: list[float] = []  # per end_to_end call: seconds spent in session.run
        self.first_batch: list[float] = []  # per end_to_end call: the first session.run's seconds

    def bare_default(self) -> None:
        for batch in self.batches:
            self.default_session.run(None, {self.input_name: batch})

    def bare_extract_session(self) -> np.ndarray:
        return np.concatenate([self.runner(batch) for batch in self.batches])

    def end_to_end(self) -> None:
        from transfer_learning.features.extract import compute
        from transfer_learning.features.store import FeatureStore

        self.last_store = Path(tempfile.mkdtemp(dir=self.tmp))  # (a few MB each, removed with the project)
        runner = TimedRunner(self.fresh_runners.pop())
        with FeatureStore(self.last_store, "0" * 64, self.runner.feature_dim) as store:
            compute(store, self.todo, runner, self.preprocessing, BATCH, self.workers)
            store.commit()
        self.inside_ort.append(runner.seconds)
        self.first_batch.append(runner.calls[0])

    def stored_rows(self) -> np.ndarray:
        from transfer_learning.features.store import FeatureStore

        with FeatureStore(self.last_store, "0" * 64, self.runner.feature_dim) as store:
            return np.concatenate(list(store.gather(list(self.todo))))

    def torch_eager(self) -> None:
        """What a user would write: torchvision model + weights.transforms() + DataLoader + inference_mode."""
        import torch
        from PIL import Image
        from torch.utils.data import DataLoader

        if not hasattr(self, "eager_model"):
            self.eager_model = self.backbone.model().eval()
            self.eager_model.classifier = torch.nn.Identity()
        transform, paths = self.preprocessing.transform(), self.paths

        class Images(torch.utils.data.Dataset):
            def __len__(self):
                return len(paths)

            def __getitem__(self, i):
                return transform(Image.open(paths[i]).convert("RGB"))

        with torch.inference_mode():
            for batch in DataLoader(Images(), batch_size=BATCH, num_workers=self.workers):
                self.eager_model(batch)


def phases(sides: Sides, reps: int) -> dict[str, Timing]:
    """Each phase of extract alone, in this process, per batch of BATCH images (the workers' share is CPU time
    that runs on the same 2 cores as ONNX Runtime)."""
    from transfer_learning.data.pixels import NormalizeTable
    from transfer_learning.features.views import ViewDataset, collate

    requests = list(sides.todo.values())[:BATCH]
    dataset = ViewDataset(requests, sides.preprocessing, grey_planes=True)  # as extract.compute reads them
    normalize = NormalizeTable.of(sides.preprocessing)
    out = np.empty_like(sides.batches[0])
    pixels, _, _ = collate([dataset[i] for i in range(len(requests))])
    return {
        "read + sha256 + decode + resize + crop (worker)": repeat(
            lambda: collate([dataset[i] for i in range(len(requests))]), reps),
        "normalize (main process)": repeat(lambda: normalize(pixels.numpy(), out), reps),
        "ONNX Runtime (main process)": repeat(lambda: sides.runner(sides.batches[0]), reps),
    }


def incremental(project: Path, per_class: int, reps: int) -> tuple[dict[str, Timing], dict, int]:
    """With 90 % of the rows in the store vs cold (empty store): the stage's seconds (whole process) and its
    compute_seconds (reports/timings/extract.json), as Timings keyed more/cold/more_compute/cold_compute; the last +10 %
    run's metrics; the last cold run's peak RSS."""
    store = project / "data/feature-store"
    set_params(project, per_class)
    run_stage(project, "prepare")
    run_stage(project, "extract")
    saved = project / "store-with-90-percent"
    shutil.copytree(store, saved)
    set_params(project, math.ceil(per_class * 1.1))
    run_stage(project, "prepare")
    seconds: dict[str, list[float]] = {"more": [], "cold": [], "more_compute": [], "cold_compute": []}
    for rep in range(1 + reps):  # the first of each is the warm-up
        shutil.rmtree(store)
        shutil.copytree(saved, store)
        seconds["more"].append(run_stage(project, "extract")[0])
        more_metrics = extract_metrics(project)
        seconds["more_compute"].append(more_metrics["compute_seconds"])
        shutil.rmtree(store)
        cold_seconds, rss = run_stage(project, "extract")
        seconds["cold"].append(cold_seconds)
        seconds["cold_compute"].append(extract_metrics(project)["compute_seconds"])
    shutil.rmtree(saved)
    return {name: Timing(tuple(values[1:])) for name, values in seconds.items()}, more_metrics, rss


def print_comparison(sides: Sides, n: int, timings: dict[str, Timing], identical: bool,
                     by_phase: dict[str, Timing], args) -> None:
    e2e, ort_only, ort_ours = (timings[k] for k in ("extract", "ort", "ort_extract_session"))
    print(f"CPU ({os.cpu_count()} cores), MobileNetV2 @ 224, batch {BATCH}, extract.workers {sides.workers}; "
          f"comparison 1 on the same {n} Fashion-MNIST images per repetition, {args.reps} repetitions after 1 warm-up")
    print(f"  extract compute path  {e2e.rate(n):7.1f} img/s  {e2e}")
    print(f"  ORT alone (defaults)  {ort_only.rate(n):7.1f} img/s  {ort_only}")
    print(f"  ORT alone (extract's session options) {ort_ours.rate(n):7.1f} img/s  {ort_ours}")
    if "eager" in timings:
        print(f"  torch eager + DataLoader {timings['eager'].rate(n):7.1f} img/s  {timings['eager']}")
    print(ratio_line("extract / ORT alone (defaults)", ort_only.median / e2e.median, e2e, ort_only))
    print(ratio_line("extract / ORT alone on extract's session", ort_ours.median / e2e.median, e2e, ort_ours))
    best = min(ort_only, ort_ours, key=lambda timing: timing.median)
    print(f"extract / the faster ORT alone (target >= 0.9): {best.median / e2e.median:.2f}")
    inside = Timing(tuple(sides.inside_ort[-args.reps:]))  # the timed repetitions (the first call was the warm-up)
    print(f"  the gap: extract {e2e.median:.2f} s = ORT inside the loop {inside.median:.2f} s "
          f"(vs {ort_ours.median:.2f} "
          f"s alone on the same session: the decoding workers share the cores) + "
          f"{e2e.median - inside.median:.2f} s outside ORT on the critical path (worker start-up, the first batch, "
          f"store writes); medians")
    first = Timing(tuple(sides.first_batch[-args.reps:]))
    print(f"  of ORT inside the loop, the first batch (a new session's first run, as in the stage): "
          f"{first.median:.2f} s "
          f"(a warm batch alone: {ort_ours.median / len(sides.batches):.2f} s)")
    if "eager" in timings:
        print(ratio_line("extract / torch eager (target >= 3)", timings["eager"].median / e2e.median, e2e,
                         timings["eager"]))
    expected = "" if identical else " (differ!)"
    print(f"  extract's rows == side b's rows (plain per-image preprocessing of the same images), bit for bit: "
          f"{identical}{expected}")
    print(f"  where the time goes, per batch of {BATCH}, one phase at a time in one process (median of {args.reps}):")
    for phase, timing in by_phase.items():
        print(f"    {phase:50s} {1000 * timing.median:7.1f} ms  (spread {timing.spread:.0%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=640, help="images per repetition in comparison 1")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=64, help="comparison 2: 10x this many images + 10 %%")
    parser.add_argument("--big-per-class", type=int, default=500)
    parser.add_argument("--only-ort", action="store_true", help="comparison 1 against ORT alone, nothing else")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="extract-bench-") as tmp:
        project = Path(tmp)
        set_params(project, max(args.per_class, math.ceil(args.images / 10)))
        for stage in ("prepare", "download", "export"):
            run_stage(project, stage)
        sides = Sides(project, args.images, args.reps)
        n = len(sides.todo)
        timings = interleaved({"extract": sides.end_to_end, "ort": sides.bare_default,
                               "ort_extract_session": sides.bare_extract_session}
                              | ({} if args.only_ort else {"eager": sides.torch_eager}), reps=args.reps)
        expected, stored = sides.bare_extract_session(), sides.stored_rows()
        identical = np.array_equal(expected.view(np.uint32), stored.view(np.uint32))
        by_phase = phases(sides, args.reps)
        if args.only_ort:
            print_comparison(sides, n, timings, identical, by_phase, args)
            return

        added, more_metrics, small_rss = incremental(project, args.per_class, args.reps)
        store_files = list((project / "data/feature-store").glob("*/*.h5"))
        bytes_per_row = sum(f.stat().st_size for f in store_files) / more_metrics["store_rows"]
        feature_dim = more_metrics["feature_dim"]

        shutil.rmtree(project / "data/feature-store")
        set_params(project, args.big_per_class)
        run_stage(project, "prepare")
        _, big_rss = run_stage(project, "extract")
        big = extract_metrics(project)

    print_comparison(sides, n, timings, identical, by_phase, args)
    more, cold = added["more"], added["cold"]
    print(ratio_line(f"+10 % images: stage seconds with the store holding {more_metrics['reused']} rows / cold "
                     f"(target <= 0.25; {more_metrics['computed']} computed; Python start-up and imports, ~5 s, are "
                     f"on both sides)", more.median / cold.median, more, cold))
    more, cold = added["more_compute"], added["cold_compute"]
    print(ratio_line("  the same, compute phase only (reports/timings/extract.json compute_seconds)", more.median / cold.median,
                     more, cold))
    print(f"peak RSS (one run each): {big['images']} images {big_rss} MB vs {more_metrics['images']} images "
          f"{small_rss} MB   ratio = {big_rss / small_rss:5.2f}  (target <= 1.2)")
    print(f"store: {bytes_per_row:.0f} bytes/row vs feature_dim x 4 = {feature_dim * 4}   ratio = "
          f"{bytes_per_row / (feature_dim * 4):5.3f}")


if __name__ == "__main__":
    main()
