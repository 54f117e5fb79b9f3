"""dvc.yaml's deps cover every project file a stage imports: an edit to an imported file that is not a dep would
leave `dvc status` clean and the old outputs in place, a wrong result."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "stages"


def project_imports(path: Path) -> set[Path]:
    """The project's .py files that `path` imports, at any depth in the file (lazy imports in functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] != PACKAGE:
                continue
            module = ROOT / (name.replace(".", "/") + ".py")
            package = ROOT / name.replace(".", "/") / "__init__.py"
            found |= {p for p in (module, package) if p.is_file()}
    return found


def import_closure(script: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += project_imports(path)
    return seen


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_imported_project_file_is_a_dep(name):
    stage = STAGES[name]
    module = stage["cmd"].split()[-1]
    script = ROOT / (module.replace(".", "/") + ".py")
    deps = [ROOT / (d if isinstance(d, str) else next(iter(d))) for d in stage.get("deps", [])]
    uncovered = sorted(
        str(p.relative_to(ROOT)) for p in import_closure(script)
        if p.name != "__init__.py" and not any(p == d or d in p.parents for d in deps))
    assert not uncovered, f"dvc.yaml stage {name!r} imports these files but does not depend on them: {uncovered}"


def test_the_closure_follows_lazy_imports():
    closure = {str(p.relative_to(ROOT)) for p in import_closure(ROOT / "stages/finetune.py")}
    assert "stages/core/finetune_loop.py" in closure
    assert "stages/core/advisor.py" in closure  # imported inside a function
