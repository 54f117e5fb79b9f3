"""CPU seconds a stage process spends importing its module, before any work: every `dvc repro` pays it once per
stage that runs, and the test suite pays it for every stage it runs. Each stage is imported in a fresh interpreter
(bytecode already cached), REPEATS times; prints the median and the spread, and beside it what `import torch` and
`import torchvision` alone cost in the same run, the yardsticks the stages are measured against.

    python benchmarks/stage_imports.py
"""
from __future__ import annotations

import resource
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPEATS = 5
MODULES = ["torch", "torchvision", "stages.check_params", "stages.prepare", "stages.download", "stages.export",
           "stages.extract", "stages.train_heads", "stages.advise", "stages.audit", "stages.finetune",
           "stages.evaluate", "stages.predict", "stages.layers", "stages.store"]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def import_cpu(module: str) -> float:
    before = children_cpu()
    subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, check=True)
    return children_cpu() - before


def main() -> None:
    import_cpu("stages.export")  # writes the project's bytecode once, as the first stage of a repro does
    print(f"{'module':22s} {'median s':>9s} {'min':>6s} {'max':>6s}   (CPU, {REPEATS} fresh processes each)")
    for module in MODULES:
        seconds = [import_cpu(module) for _ in range(REPEATS)]
        print(f"{module:22s} {statistics.median(seconds):9.2f} {min(seconds):6.2f} {max(seconds):6.2f}")


if __name__ == "__main__":
    main()
