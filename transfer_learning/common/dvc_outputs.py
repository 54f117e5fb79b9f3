"""The paths DVC owns in a project: every output, metric and plot of dvc.yaml's stages and every `.dvc`-tracked path.

DVC replaces such a path as a whole (`dvc repro`, `dvc checkout`, `dvc exp apply` restore it from its cache), so
nothing of the project's own may be kept inside one. A templated path (`models/heads/${key}` of a `foreach` stage)
stands for every folder its template can become: each `${...}` component matches any name.
"""
from __future__ import annotations

import fnmatch
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from transfer_learning.common.errors import UserError

# libyaml's loader when PyYAML has it: dvc.yaml is read on every params validation, and the pure-Python one takes 25 ms
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
TEMPLATE = re.compile(r"\$\{[^}]*\}")
OUTPUT_KINDS = ("outs", "metrics", "plots")


@dataclass(frozen=True)
class DvcOutput:
    path: str  # relative to the project's root, POSIX; `*` where dvc.yaml has a template
    owner: str  # "stage <name> in dvc.yaml" or "<file>.dvc"

    def holds(self, relative: PurePosixPath) -> bool:
        """True when `relative` (a path relative to the root) is this output or inside it."""
        pattern = PurePosixPath(self.path).parts
        return len(relative.parts) >= len(pattern) and all(
            fnmatch.fnmatchcase(part, glob) for part, glob in zip(relative.parts, pattern))


def _entry_paths(entries) -> list[str]:
    """The paths of an `outs`/`metrics`/`plots` list: each item a path, or a one-key mapping path → options."""
    paths = []
    for entry in entries or []:
        if isinstance(entry, str):
            paths.append(entry)
        elif isinstance(entry, dict):
            paths.extend(str(key) for key in entry)
    return paths


def stage_outputs(root: Path) -> list[DvcOutput]:
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        return []
    try:
        stages = (yaml.load(dvc_yaml.read_text(), Loader=YAML_LOADER) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"{dvc_yaml} cannot be read ({error}): the outputs it declares decide where the feature "
                        "store may live") from None
    found = []
    for name, stage in stages.items():
        body = stage.get("do", stage) if isinstance(stage, dict) else {}
        for kind in OUTPUT_KINDS:
            for path in _entry_paths(body.get(kind)):
                found.append(DvcOutput(TEMPLATE.sub("*", path).rstrip("/"), f"stage {name} in dvc.yaml"))
    return found


def _dvc_files(root: Path) -> list[Path]:
    """Every `.dvc` file of the project: git's list (tracked and untracked, not ignored) when the root is a
    checkout; otherwise a walk that skips hidden folders."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "*.dvc"],
                            cwd=root, capture_output=True, text=True, check=False) if (root / ".git").exists() else None
    if listed is not None and listed.returncode == 0:
        return [root / name for name in listed.stdout.split("\0") if name]
    return [path for path in root.rglob("*.dvc")
            if not any(part.startswith(".") for part in path.relative_to(root).parts[:-1])]


def tracked_outputs(root: Path) -> list[DvcOutput]:
    found = []
    for dvc_file in _dvc_files(root):
        try:
            outs = (yaml.load(dvc_file.read_text(), Loader=YAML_LOADER) or {}).get("outs") or []
        except (OSError, yaml.YAMLError, AttributeError):
            continue  # not a DVC file DVC could use either; `dvc status` reports it
        for out in outs:
            if isinstance(out, dict) and "path" in out:
                target = (dvc_file.parent / str(out["path"])).resolve()
                if target == root or root in target.parents:
                    found.append(DvcOutput(target.relative_to(root).as_posix(),
                                           dvc_file.relative_to(root).as_posix()))
    return found


def dvc_outputs(root: Path) -> list[DvcOutput]:
    root = root.resolve()
    return stage_outputs(root) + tracked_outputs(root)


def output_holding(root: Path, target: Path) -> DvcOutput | None:
    """The DVC output that `target` is or sits inside, if any."""
    root, target = root.resolve(), target.resolve()
    if target != root and root not in target.parents:
        return None
    relative = PurePosixPath(target.relative_to(root).as_posix())
    return next((output for output in dvc_outputs(root) if output.holds(relative)), None)
