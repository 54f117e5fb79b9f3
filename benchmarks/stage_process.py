"""Runs a pipeline stage the way DVC does, as its own process, in a benchmark's temporary project."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_stage(project: Path, stage: str) -> None:
    """`python -m stages.<stage>` in `project`, with this checkout's code; exits with its stderr if it fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"stages.{stage} failed in {project}:\n{result.stderr}")
