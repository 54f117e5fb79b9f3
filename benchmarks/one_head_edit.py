"""A one-head edit, from `dvc exp run -S heads.logreg.C=[...]` to updated metrics, on the default data (issue 15.4).

    python benchmarks/one_head_edit.py [--per-class 300] [--reps 5]

Builds a temporary git + DVC project with this checkout's code, dvc.yaml and params.yaml (CPU provider) on the
default data, runs the whole pipeline once (its own feature store, built there), then times, with warm-up excluded:

  now:    `dvc exp run -S heads.logreg.C=[c]`: train_heads@logreg and evaluate run (plus validate, and finetune,
          which depends on models/heads and skips when disabled); the other heads' stages are skipped
  before: the same edit when every head retrains, as when train_heads was one stage for all heads (before this
          change): the same command plus a new `seed` for every other head, so that every head stage runs

Every repetition sets a C no earlier one used (1.0, 1.01, 1.02, ...: the same work each time), so DVC's run cache
never restores a head instead of training it. Each timed run is checked to have run exactly the stages above.
"""
from __future__ import annotations

import argparse
import itertools
import os
import resource
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import ratio_line, repeat  # noqa: E402


class Project:
    def __init__(self, root: Path, per_class: int):
        self.root = root
        for package in ("stages", "transfer_learning"):
            shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
        for name in (".dvcignore", "dvc.yaml"):
            shutil.copy(REPO / name, root / name)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["data"]["per_class"] = per_class
        params["extract"]["providers"] = ["CPUExecutionProvider"]
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        self.heads = list(params["heads"])
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        for command in (["git", "init", "-q"], ["git", "config", "user.email", "bench@example.com"],
                        ["git", "config", "user.name", "bench"], ["dvc", "init", "-q"],
                        ["dvc", "config", "core.analytics", "false"]):
            self.run(*command)

    def run(self, *command: str) -> str:
        if command[0] == "dvc":
            command = (sys.executable, "-m", *command)
        result = subprocess.run(command, cwd=self.root, env=self.env, text=True, capture_output=True)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout + result.stderr

    def commit(self, message: str) -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-qm", message)


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=300, help="images per class (default data: 300)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="one-head-edit-") as tmp:
        project = Project(Path(tmp), args.per_class)
        started = time.perf_counter()
        project.run("dvc", "repro")
        print(f"whole pipeline once ({args.per_class * 10} images, features computed into the project's own store): "
              f"{time.perf_counter() - started:.1f} s")
        project.commit("baseline")

        values = (f"{1 + i / 100:g}" for i in itertools.count())
        others = [name for name in project.heads if name != "logreg"]
        seeds = itertools.count(1)

        cpu: dict[str, list[float]] = {"now": [], "before": []}

        def one_head() -> None:
            started = children_cpu_seconds()
            out = project.run("dvc", "exp", "run", "-S", f"heads.logreg.C=[{next(values)}]")
            cpu["now"].append(children_cpu_seconds() - started)
            assert ran(out) == {"validate", "train_heads@logreg", "finetune", "evaluate"}, ran(out)

        def every_head() -> None:
            seed = next(seeds)
            started = children_cpu_seconds()
            out = project.run("dvc", "exp", "run", "-S", f"heads.logreg.C=[{next(values)}]",
                              *itertools.chain.from_iterable(("-S", f"++heads.{name}.seed={seed}") for name in others))
            cpu["before"].append(children_cpu_seconds() - started)
            assert ran(out) == {"validate", *(f"train_heads@{n}" for n in project.heads), "finetune", "evaluate"}, \
                ran(out)

        now = repeat(one_head, reps=args.reps, warmup=1)
        before = repeat(every_head, reps=args.reps, warmup=1)
        # where the seconds go: each stage the edit runs, as its own process (imports included), without DVC
        stages = {"validate": [], "train_heads@logreg": ["logreg"], "finetune": [], "evaluate": []}
        parts = {stage: repeat(lambda: project.run(sys.executable, "-m", f"stages.{stage.split('@')[0]}", *argv),
                               reps=args.reps, warmup=1) for stage, argv in stages.items()}
    for stage, timing in parts.items():
        print(f"  {stage} alone: {timing}")
    print(f"  DVC's own share of the one-head edit: {now.median - sum(t.median for t in parts.values()):.2f} s "
          "(the median minus the stages' medians)")
    print(f"one-head edit, dvc exp run to updated metrics (target <= 5 s): {now}")
    print(f"the same edit with every head retrained (train_heads as one stage): {before}")
    print(ratio_line("speed-up, every head / one head", before.median / now.median, now, before))
    # CPU seconds of every process the command ran (user + system; warm-up included): what a busy machine inflates
    # least, and about the wall time on an idle one, as the stages run one after another
    print(f"CPU seconds per edit, median: one head {statistics.median(cpu['now']):.2f} s, "
          f"every head {statistics.median(cpu['before']):.2f} s")


if __name__ == "__main__":
    main()
