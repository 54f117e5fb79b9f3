"""A one-head edit, from `dvc exp run -S heads.logreg.C=[...]` to updated metrics, on the default data.

    python benchmarks/one_head_edit.py [--per-class 300] [--reps 5] [--no-before] [--against REV]

Builds a temporary git + DVC project with this checkout's code, dvc.yaml and params.yaml (CPU provider) on the
default data, runs the whole pipeline once (its own feature store, built there), then times, with warm-up excluded:

  now:    `dvc exp run -S heads.logreg.C=[c]`: train_heads@logreg and evaluate run (plus finetune, which depends
          on models/heads and skips when disabled); the other heads' stages are skipped
  before: the same edit when every head retrains, as when train_heads was one stage for all heads (before this
          change): the same command plus a new `seed` for every other head, so that every head stage runs

  --against REV: the same one-head edit in a second project made from commit REV's code, dvc.yaml and params.yaml
          (its own pipeline run first), the two taken in turn: an absolute target on a machine whose speed drifts
          from hour to hour is best read beside the same edit on earlier code, measured in the same minutes

Every repetition sets a C no earlier one used (1.0, 1.01, 1.02, ...: the same work each time), so DVC's run cache
never restores a head instead of training it. Each timed run is checked to have run exactly the stages above. The
two sides' repetitions are taken in turn. Where the seconds go: each stage the edit runs, alone as its own process;
DVC's own share (the edit minus those); and DVC's floor on this machine: a `dvc exp run` that runs nothing, in this
project and in a one-stage toy project. The "before" side retrains the torch heads (100 epochs each): most of the
default run's ~7 minutes on an idle 2-core machine; --no-before leaves it out (no ratio printed then).
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
from typing import Callable

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved, ratio_line  # noqa: E402


class Repo:
    """A git + DVC repository in `root`, driven with this interpreter's dvc."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def init(self) -> None:
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


class Toy(Repo):
    """One stage, one param, one small output: what any `dvc exp run` costs here."""

    def __init__(self, root: Path):
        super().__init__(root)
        root.mkdir()
        (root / "params.yaml").write_text("x: 1\n")
        (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"copy": {
            "cmd": "python -c \"import shutil; shutil.copy('params.yaml', 'out.txt')\"",
            "params": ["x"], "outs": ["out.txt"]}}}))
        self.init()
        self.run("dvc", "repro")
        self.commit("toy")


class Project(Repo):
    def __init__(self, root: Path, per_class: int, source: Path = REPO):
        super().__init__(root)
        for package in ("stages", "transfer_learning"):
            shutil.copytree(source / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
        for name in (".dvcignore", "dvc.yaml"):
            shutil.copy(source / name, root / name)
        params = yaml.safe_load((source / "params.yaml").read_text())
        params["data"]["per_class"] = per_class
        params["extract"]["providers"] = ["CPUExecutionProvider"]
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        self.heads = list(params["heads"])
        self.init()


def code_at(rev: str, into: Path) -> Path:
    """This repository's stages, library, dvc.yaml, params.yaml and .dvcignore at commit `rev`, in `into`."""
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "stages", "transfer_learning", "dvc.yaml",
                              "params.yaml", ".dvcignore"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}


def yaml_parser() -> str:
    """Which YAML parser DVC's reads of dvc.yaml and dvc.lock use here: they are much of DVC's own time."""
    from ruamel.yaml.main import CParser

    return "libyaml (C, ruamel.yaml.clib)" if CParser is not None else "pure Python (no ruamel.yaml.clib)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=300, help="images per class (default data: 300)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-before", action="store_true", help="time the one-head edit only (no ratio)")
    parser.add_argument("--against", metavar="REV", help="also time the edit on commit REV's code, in turn")
    args = parser.parse_args()
    cpu: dict[str, list[float]] = {}

    def measured(name: str, run: Callable[[], object]) -> Callable[[], None]:
        """`run`, recording the CPU seconds (user + system) of every process it starts under `name`."""
        def wrapped() -> None:
            started = children_cpu_seconds()
            run()
            cpu.setdefault(name, []).append(children_cpu_seconds() - started)
        return wrapped

    with tempfile.TemporaryDirectory(prefix="one-head-edit-") as tmp:
        project = Project(Path(tmp) / "project", args.per_class)
        started = time.perf_counter()
        project.run("dvc", "repro")
        print(f"whole pipeline once ({args.per_class * 10} images, features computed into the project's own store): "
              f"{time.perf_counter() - started:.1f} s; DVC reads YAML with {yaml_parser()}")
        project.commit("baseline")
        stages = len(project.run("dvc", "stage", "list", "--name-only").split())

        # DVC's floor: a `dvc exp run` that runs no stage, in a one-stage toy project and in this one
        toy = Toy(Path(tmp) / "toy")
        floors = {"toy": measured("no-op, toy", lambda: toy.run("dvc", "exp", "run")),
                  "project": measured("no-op, project", lambda: project.run("dvc", "exp", "run"))}
        floor = interleaved(floors, reps=args.reps, warmup=1)
        assert not ran(project.run("dvc", "exp", "run")), "a no-op exp run ran a stage"

        values = (f"{1 + i / 100:g}" for i in itertools.count())
        others = [name for name in project.heads if name != "logreg"]
        seeds = itertools.count(1)

        def one_head() -> None:
            out = project.run("dvc", "exp", "run", "-S", f"heads.logreg.C=[{next(values)}]")
            assert ran(out) == {"train_heads@logreg", "finetune", "evaluate"}, ran(out)

        def one_head_earlier(earlier: Project) -> Callable[[], None]:
            def run() -> None:
                out = earlier.run("dvc", "exp", "run", "-S", f"heads.logreg.C=[{next(values)}]")
                assert {"train_heads@logreg", "evaluate"} <= ran(out), ran(out)
                assert not {f"train_heads@{name}" for name in others} & ran(out), ran(out)
            return run

        def every_head() -> None:
            seed = next(seeds)
            out = project.run("dvc", "exp", "run", "-S", f"heads.logreg.C=[{next(values)}]",
                              *itertools.chain.from_iterable(("-S", f"++heads.{name}.seed={seed}") for name in others))
            assert ran(out) == {*(f"train_heads@{n}" for n in project.heads), "finetune", "evaluate"}, ran(out)

        sides = {"now": measured("now", one_head)}
        if not args.no_before:
            sides["before"] = measured("before", every_head)
        if args.against:
            earlier = Project(Path(tmp) / "earlier", args.per_class, code_at(args.against, Path(tmp) / "earlier-code"))
            earlier.run("dvc", "repro")
            earlier.commit("baseline")
            sides[args.against] = measured(args.against, one_head_earlier(earlier))
        edits = interleaved(sides, reps=args.reps, warmup=1)
        # where the seconds go: each stage the edit runs, as its own process (imports included), without DVC, doing
        # the edit's work: one C value; evaluate redraws the edited head's confusion image (its PNG removed first)
        edited_image = project.root / "reports" / "confusion" / "logreg.png"

        def stage_alone(stage: str, *argv: str) -> Callable[[], None]:
            def run() -> None:
                if stage == "evaluate":
                    edited_image.unlink()
                project.run(sys.executable, "-m", f"stages.{stage.split('@')[0]}", *argv)
            return measured(stage, run)

        parts = interleaved({"check_params": stage_alone("check_params"),
                             "train_heads@logreg": stage_alone("train_heads@logreg", "logreg"),
                             "finetune": stage_alone("finetune"), "evaluate": stage_alone("evaluate")},
                            reps=args.reps, warmup=1)

    def cpu_of(name: str) -> str:  # warm-up included
        return f"CPU {statistics.median(cpu[name]):.2f} s"

    now = edits["now"]
    stages_total = sum(t.median for t in parts.values())
    for stage, timing in parts.items():
        print(f"  {stage} alone: {timing}; {cpu_of(stage)}")
    print(f"  the stages alone, total: {stages_total:.2f} s")
    print(f"  DVC's own share of the one-head edit: {now.median - stages_total:.2f} s (the edit's median minus the "
          f"stages' medians), of which a no-op `dvc exp run` here: {floor['project'].median:.2f} s")
    print(f"  DVC's floor, a no-op `dvc exp run` in a one-stage toy project: {floor['toy']}; {cpu_of('no-op, toy')}")
    print(f"  a no-op `dvc exp run` in this project ({stages} stages): {floor['project']}; {cpu_of('no-op, project')}")
    print(f"one-head edit, dvc exp run to updated metrics (target <= 5 s): {now}; {cpu_of('now')}")
    if args.against:
        at = edits[args.against]
        print(f"the same edit on commit {args.against}'s code, taken in turn with it: {at}; {cpu_of(args.against)}")
        print(ratio_line(f"now / at {args.against}", now.median / at.median, now, at))
    if "before" in edits:
        before = edits["before"]
        print(f"the same edit with every head retrained (train_heads as one stage): {before}; {cpu_of('before')}")
        print(ratio_line("speed-up, every head / one head", before.median / now.median, now, before))
    # CPU seconds of every process a command ran: what a busy machine inflates least, and about the wall time on an
    # idle one, as the stages run one after another


if __name__ == "__main__":
    main()
