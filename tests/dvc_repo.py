"""A real git + DVC repository holding a copy of this project, for end-to-end tests."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import DEFAULT_PARAMS, REPO, merged

PLOTS_PAGE = "plots_page.html"  # the project's .dvc/config names it as plots.html_template


def stage_env() -> dict[str, str]:
    """The stages run `python`: the interpreter running the tests, whatever venv it is in. DVC_NO_ANALYTICS: `dvc
    init` would otherwise start a detached analytics process (1 CPU-s) before .dvc/config can turn analytics off."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "DVC_NO_ANALYTICS": "1"}


class DvcRepo:
    def __init__(self, root: Path, **params):
        self.root = root
        for package in ("stages", "transfer_learning"):
            shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(REPO / ".dvcignore", root / ".dvcignore")  # bytecode in the directory deps is not code
        # what git leaves out of a clone of the project: the downloaded datasets (53 MB of Fashion-MNIST) and the
        # feature store, which each experiment's copy of the repository would otherwise carry
        shutil.copy(REPO / ".gitignore", root / ".gitignore")
        shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
        shutil.copytree(REPO / "data" / "curation", root / "data" / "curation")  # a dep of prepare
        self.set_params(**params)
        self.env = stage_env()
        self.run("git", "init", "-q")
        self.run("git", "config", "user.email", "test@example.com")
        self.run("git", "config", "user.name", "test")
        self.dvc("init", "-q")
        shutil.copy(REPO / ".dvc" / PLOTS_PAGE, root / ".dvc" / PLOTS_PAGE)  # `dvc plots show` renders offline
        with (root / ".dvc" / "config").open("a") as config:  # what `dvc config` writes, without starting dvc
            config.write(f"[core]\n    analytics = false\n[plots]\n    html_template = {PLOTS_PAGE}\n")
        self.run("git", "add", "-A")
        self.run("git", "commit", "-qm", "init")

    @classmethod
    def copy_of(cls, source: Path, root: Path) -> DvcRepo:
        """A copy of the repository at `source` (git history, DVC cache and workspace) at `root`."""
        shutil.copytree(source, root, symlinks=True)
        repo = cls.__new__(cls)
        repo.root = root
        repo.env = stage_env()
        return repo

    def set_params(self, **params) -> None:
        (self.root / "params.yaml").write_text(yaml.safe_dump(merged(DEFAULT_PARAMS, params), sort_keys=False))

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(command, cwd=self.root, env=getattr(self, "env", None), text=True,
                                capture_output=True)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def dvc(self, *args: str, check: bool = True) -> str:
        started = time.perf_counter()
        result = self.run(sys.executable, "-m", "dvc", *args, check=check)
        print(f"dvc {' '.join(args)}: {time.perf_counter() - started:.1f} s")  # shown with -s or on failure
        return result.stdout + result.stderr
