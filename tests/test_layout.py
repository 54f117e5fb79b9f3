"""The package layout (docs/design.md, "Layout"): one library package, transfer_learning, that never imports a
stage script and has no import cycles; one thin main() per stage script in stages/."""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "transfer_learning"
STAGE_SCRIPTS = sorted(p for p in (ROOT / "stages").glob("*.py") if p.name != "__init__.py")
MAIN_MAX_LINES = 40


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every import anywhere in the file: module level, in functions, under TYPE_CHECKING.
    `from a.b import c` gives a.b and a.b.c (c may be a module)."""
    return list(_imported_names(path, path.read_text()))


@functools.lru_cache(maxsize=None)  # by text: several checks read every module, and parsing is the cost
def _imported_names(path: Path, text: str) -> tuple[tuple[int, str], ...]:
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: a relative import"
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return tuple(found)


LIBRARY_MODULES = {module_name(p): p for p in LIBRARY.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """Library module -> the library modules it imports (a package's __init__ included: Python runs it)."""
    graph = {}
    for name, path in LIBRARY_MODULES.items():
        edges = set()
        for _, imported in imported_names(path):
            parts = imported.split(".")
            edges |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & LIBRARY_MODULES.keys()
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_library_never_imports_a_stage_script():
    offenders = [f"{path.relative_to(ROOT)}:{line}: {name}" for path in LIBRARY_MODULES.values()
                 for line, name in imported_names(path) if name.split(".")[0] == "stages"]
    assert not offenders, f"library modules import stage scripts (move that code into transfer_learning): {offenders}"


def test_stage_scripts_are_imported_by_no_other_code():
    """Only the tests call a stage's main(); the stages, the library and the benchmarks never import one."""
    sources = STAGE_SCRIPTS + sorted((ROOT / "benchmarks").glob("*.py"))
    offenders = [f"{path.relative_to(ROOT)}:{line}: {name}" for path in sources
                 for line, name in imported_names(path) if name.split(".")[0] == "stages"]
    assert not offenders, f"stage scripts imported by other code: {offenders}"


def test_no_import_cycles_in_the_library():
    graph = import_graph()
    assert "transfer_learning.heads.files" in graph and graph["transfer_learning.finetune.run"], "graph not built"
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_cycle_check_sees_function_level_imports():
    graph = {"a": {"b"}, "b": set()}
    assert find_cycle(graph) is None
    graph["b"].add("a")
    assert find_cycle(graph) == ["a", "b", "a"]
    lazy = import_graph()["transfer_learning.finetune.run"]
    assert "transfer_learning.advise.advisor" in lazy  # imported inside resolve_unfreeze()


def test_package_init_files_hold_only_a_docstring():
    """Importing one module runs every __init__.py above it: they stay free of imports and code."""
    for path in LIBRARY.rglob("__init__.py"):
        body = ast.parse(path.read_text()).body
        assert body and all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body), path


def test_every_dvc_stage_has_its_script():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        if "foreach" in stage:  # one stage per item: the item is the script's argument
            assert stage["do"]["cmd"] == f"python -m stages.{name} ${{key}}", name
        else:
            assert stage["cmd"] == f"python -m stages.{name}", name
        assert (ROOT / "stages" / f"{name}.py") in STAGE_SCRIPTS, name


@pytest.mark.parametrize("script", STAGE_SCRIPTS, ids=lambda p: p.stem)
def test_main_is_thin(script):
    mains = [n for n in ast.parse(script.read_text()).body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert len(mains) == 1, f"{script.name} has no main()"
    lines = mains[0].end_lineno - mains[0].lineno + 1
    assert lines <= MAIN_MAX_LINES, f"{script.name}: main() is {lines} lines (at most {MAIN_MAX_LINES}): move " \
                                    "the work into transfer_learning"
