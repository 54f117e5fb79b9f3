"""What measuring the preprocessing costs a stage run: the probe digest (data/probes.py) every fingerprint holds,
computed once per process. Each repetition is a fresh interpreter, as a stage run is; timed inside it:

- cold: the first digest in a process that has imported the library (as every stage has) but opened no image yet:
  Pillow's format plugins, pypng and tifffile are loaded on the way;
- warm: a second digest under another preprocessing in the same process, the probes' own work.

    .venv/bin/python benchmarks/probe_digest.py
"""
from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPS = 7
CHILD = """
import time
from transfer_learning.data.images import Preprocessing
from transfer_learning.data.probes import probe_files
imagenet = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bilinear")
started = time.perf_counter()
Preprocessing(resize=256, crop=224, **imagenet).probe_digest()
cold = time.perf_counter() - started
started = time.perf_counter()
Preprocessing(resize=232, crop=224, bit_depth=12, **imagenet).probe_digest()
print(cold, time.perf_counter() - started, len(probe_files()), sum(p.stat().st_size for p in probe_files()))
"""


def main() -> None:
    runs = []
    for _ in range(REPS):
        done = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, check=True)
        runs.append(done.stdout.split())
    cold, warm = ([float(run[i]) for run in runs] for i in (0, 1))
    count, size = runs[0][2], int(runs[0][3])
    print(f"{count} probe images, {size:,} bytes, resize 256 / crop 224, {REPS} fresh processes")
    for name, seconds in (("cold (first digest in a process)", cold), ("warm (another preprocessing)", warm)):
        print(f"{name}: median {statistics.median(seconds):.3f} s (min {min(seconds):.3f}, max {max(seconds):.3f})")


if __name__ == "__main__":
    main()
