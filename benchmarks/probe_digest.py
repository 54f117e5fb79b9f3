"""What measuring the preprocessing costs a stage run: the probe digest (data/probes.py) every fingerprint holds,
computed once per process. Each repetition is a fresh interpreter, as a stage run is; timed inside it:

- cold: the first digest in a process that has imported the library (as every stage has) but opened no image yet:
  Pillow's format plugins, pypng and tifffile are loaded on the way;
- warm: a second digest under another preprocessing in the same process, the probes' own work.

Each is reported as wall time and as the process's CPU time: on a loaded machine the wall time measures the queue
for a core, the CPU time what the digest costs.

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
started, cpu = time.perf_counter(), time.process_time()
Preprocessing(resize=256, crop=224, **imagenet).probe_digest()
cold, cold_cpu = time.perf_counter() - started, time.process_time() - cpu
started, cpu = time.perf_counter(), time.process_time()
Preprocessing(resize=232, crop=224, bit_depth=12, **imagenet).probe_digest()
warm, warm_cpu = time.perf_counter() - started, time.process_time() - cpu
print(cold, warm, cold_cpu, warm_cpu, len(probe_files()), sum(p.stat().st_size for p in probe_files()))
"""


def main() -> None:
    runs = []
    for _ in range(REPS):
        done = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, check=True)
        runs.append(done.stdout.split())
    cold, warm, cold_cpu, warm_cpu = ([float(run[i]) for run in runs] for i in range(4))
    count, size = runs[0][4], int(runs[0][5])
    print(f"{count} probe images, {size:,} bytes, resize 256 / crop 224, {REPS} fresh processes")
    for name, seconds in (("cold (first digest in a process), wall", cold), ("cold, CPU", cold_cpu),
                          ("warm (another preprocessing), wall", warm), ("warm, CPU", warm_cpu)):
        print(f"{name}: median {statistics.median(seconds):.3f} s (min {min(seconds):.3f}, max {max(seconds):.3f})")


if __name__ == "__main__":
    main()
