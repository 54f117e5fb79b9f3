"""dvc.yaml's deps cover every project file a stage imports: an edit to an imported file that is not a dep would
leave `dvc status` clean and the old outputs in place, a wrong result. Stages depend on their script and on the
package folders of transfer_learning they import (directory deps), so a new module in a folder is covered too."""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("stages", "transfer_learning")


def project_imports(path: Path) -> set[Path]:
    """The project's .py files that `path` imports, at any depth in the file (lazy imports in functions too), with
    the __init__.py of every package on the way (Python runs them all)."""
    return set(_project_imports(path, path.read_text()))


@functools.lru_cache(maxsize=None)  # by text: each stage's closure walks the same modules, and parsing is the cost
def _project_imports(path: Path, text: str) -> frozenset[Path]:
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: a relative import; the project uses absolute imports"
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] not in PACKAGES:
                continue
            for depth in range(1, len(parts) + 1):
                folder = ROOT.joinpath(*parts[:depth])
                found |= {p for p in (folder.with_suffix(".py"), folder / "__init__.py") if p.is_file()}
    return frozenset(found)


def import_closure(script: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += project_imports(path)
    return seen


def is_docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def stage_definitions() -> dict[str, dict]:
    """dvc.yaml's stages; a `foreach` stage by its `do` block (its deps are the same for every item: ${key} only
    appears in data paths and params)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


STAGES = stage_definitions()


def stage_script(stage: dict) -> Path:
    module = stage["cmd"].split()[stage["cmd"].split().index("-m") + 1]
    return ROOT / (module.replace(".", "/") + ".py")


def code_deps(stage: dict) -> list[Path]:
    deps = [ROOT / (d if isinstance(d, str) else next(iter(d))) for d in stage.get("deps", [])]
    deps = [d for d in deps if d.relative_to(ROOT).parts[0] in PACKAGES]
    assert not any("${" in str(d) for d in deps), "a code dep that depends on the foreach item"
    return deps


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_imported_project_file_is_a_dep(name):
    stage = STAGES[name]
    deps = code_deps(stage)
    uncovered = sorted(
        str(p.relative_to(ROOT)) for p in import_closure(stage_script(stage))
        # a package's top __init__.py outside every dep folder may only hold its docstring: no behaviour to change
        if not any(p == d or d in p.parents for d in deps) and not (p.name == "__init__.py" and is_docstring_only(p)))
    assert not uncovered, f"dvc.yaml stage {name!r} imports these files but does not depend on them: {uncovered}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_code_dep_is_imported(name):
    """The other way round: a code dep the stage does not import would re-run it after unrelated edits."""
    stage = STAGES[name]
    closure = import_closure(stage_script(stage))
    unused = sorted(str(d.relative_to(ROOT)) for d in code_deps(stage)
                    if not any(p == d or d in p.parents for p in closure))
    assert not unused, f"dvc.yaml stage {name!r} depends on code it does not import: {unused}"


def test_code_deps_are_the_script_and_package_folders():
    for name, stage in STAGES.items():
        for dep in code_deps(stage):
            where = dep.relative_to(ROOT)
            assert (dep == stage_script(stage) or dep.is_dir() or str(where) == "transfer_learning/params.py"), \
                f"dvc.yaml stage {name!r}: {where} should be the stage's script or a transfer_learning folder"


def test_the_closure_follows_lazy_imports():
    closure = {str(p.relative_to(ROOT)) for p in import_closure(ROOT / "stages/finetune.py")}
    assert "transfer_learning/finetune/loop.py" in closure
    assert "transfer_learning/advise/advisor.py" in closure  # imported inside a function


def test_the_closure_follows_imports_under_type_checking():
    closure = {str(p.relative_to(ROOT)) for p in import_closure(ROOT / "transfer_learning/heads/files.py")}
    assert "transfer_learning/params.py" in closure  # only under `if TYPE_CHECKING:`


def test_a_foreach_stage_is_read_by_its_do_block():
    assert STAGES["train_heads"]["cmd"] == "python -m stages.train_heads ${key}"
    assert stage_script(STAGES["train_heads"]) == ROOT / "stages/train_heads.py"
