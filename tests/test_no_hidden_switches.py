"""No environment variable changes what the product does behind the user's back: every variable the product's code
(transfer_learning/, stages/) reads is in ALLOWED, each with why it may be read. The crash tests' faults are not
read from the environment (tests/faults.py puts them in the processes it starts)."""
from __future__ import annotations

import ast
import functools
from pathlib import Path

from tests.conftest import REPO

PRODUCT = ("transfer_learning", "stages")

ALLOWED = {
    "LOCAL_RANK": "set by torchrun for each worker it starts: which of the node's devices a fine-tune rank uses",
    "LOCAL_WORLD_SIZE": "set by torchrun: how many ranks share the node's GPUs",
    "TRANSFER_LEARNING_FINETUNE_LAUNCHER": "set by the fine-tune launcher for the torchrun workers it starts, never "
                                           "by a user: a worker dies with its launcher",
    "OMP_NUM_THREADS": "the OpenMP thread count a user may set for any program; the fine-tune launcher only fills it "
                       "in for its workers when it is unset",
    "PYTHONPATH": "Python's own: whether local Ray workers already import the package or it must be shipped to them",
    "XDG_CACHE_HOME": "the XDG base-directory standard: where the cache folder lives",
    "TORCH_HOME": "torch's own: where torch.hub keeps downloaded weights; make setup looks for them there as torch.hub "
                  "does, without importing torch",
}
# (module, function): the call's first argument names the variable it reads
READERS = {("os", "getenv"), ("os.environ", "get"), ("os.environ", "pop"), ("os.environ", "setdefault"),
           ("environ", "get"), ("environ", "pop"), ("environ", "setdefault")}
ENVIRON = {"os.environ", "environ"}


def dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def string_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level NAME = "text" assignments."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = node.value.value
    return found


@functools.lru_cache(maxsize=None)  # by text: many modules import from the same few, and parsing is the cost
def module_constants(source: str) -> dict[str, str]:
    return string_constants(ast.parse(source))


class Reads:
    """The environment variables a module reads, as names or as what could not be resolved to one."""

    def __init__(self, path: Path, source: str, package_root: Path):
        self.path, self.tree, self.root = path, ast.parse(source), package_root
        self.names = string_constants(self.tree)
        self.names |= self.imported_constants()
        self.loops = self.loop_values()

    def imported_constants(self) -> dict[str, str]:
        """NAME imported from another module of the product, when that module assigns it a string."""
        found = {}
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PRODUCT:
                module = self.root / (node.module.replace(".", "/") + ".py")
                if module.is_file():
                    constants = module_constants(module.read_text())
                    found |= {alias.asname or alias.name: constants[alias.name] for alias in node.names
                              if alias.name in constants}
        return found

    def loop_values(self) -> dict[str, list[ast.AST]]:
        """A loop or comprehension variable over a literal tuple or list: the elements it takes."""
        found: dict[str, list[ast.AST]] = {}
        for node in ast.walk(self.tree):
            if isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.target, ast.Name) \
                    and isinstance(node.iter, (ast.Tuple, ast.List)):
                found.setdefault(node.target.id, []).extend(node.iter.elts)
        return found

    def resolve(self, node: ast.AST, depth: int = 0) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, ast.Name) and node.id in self.names:
            return [self.names[node.id]]
        if isinstance(node, ast.Name) and node.id in self.loops and depth < 2:
            return [name for element in self.loops[node.id] for name in self.resolve(element, depth + 1)]
        return [f"<unresolved {ast.unparse(node)} at {self.path}:{node.lineno}>"]

    def variables(self) -> list[str]:
        found = []
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if (dotted(node.func.value), node.func.attr) in READERS and node.args:
                    found += self.resolve(node.args[0])
            elif isinstance(node, ast.Call) and dotted(node.func) == "getenv" and node.args:
                found += self.resolve(node.args[0])
            elif isinstance(node, ast.Subscript) and dotted(node.value) in ENVIRON and isinstance(node.ctx, ast.Load):
                found += self.resolve(node.slice)
            elif isinstance(node, ast.Compare) and any(dotted(c) in ENVIRON for c in node.comparators):
                found += self.resolve(node.left)
        return found


def environment_reads(root: Path) -> dict[str, list[str]]:
    """variable -> the product files that read it."""
    reads: dict[str, list[str]] = {}
    for package in PRODUCT:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root)
            for name in Reads(relative, path.read_text(), root).variables():
                reads.setdefault(name, []).append(str(relative))
    return reads


def test_the_product_reads_no_environment_variable_but_the_allowed_ones():
    reads = environment_reads(REPO)
    hidden = {name: files for name, files in reads.items() if name not in ALLOWED}
    assert not hidden, (f"environment variables read by the product without a reason in ALLOWED: {hidden}. A switch "
                        "for tests belongs in tests/faults.py; one for users in the README and params.yaml")
    assert set(ALLOWED) <= set(reads), f"no longer read, drop from ALLOWED: {sorted(set(ALLOWED) - set(reads))}"


def test_the_scan_finds_every_way_of_reading_a_variable(tmp_path):
    """The scan on a module that reads variables each way it knows, some through constants, one it cannot name."""
    (tmp_path / "transfer_learning").mkdir()
    (tmp_path / "stages").mkdir()
    (tmp_path / "transfer_learning/names.py").write_text('IMPORTED = "FROM_ANOTHER_MODULE"\n')
    (tmp_path / "stages/reader.py").write_text(
        "import os\n"
        "from os import environ, getenv\n"
        "from transfer_learning.names import IMPORTED\n"
        'KILL = "KILL_AFTER"\n'
        "a = os.environ.get(KILL)\n"
        'b = os.getenv("BY_GETENV")\n'
        'c = os.environ["BY_SUBSCRIPT"]\n'
        'd = "BY_IN" in os.environ\n'
        "e = environ.get(IMPORTED)\n"
        'f = getenv("BY_BARE_GETENV")\n'
        'g = {key: os.environ.pop(key) for key in ("IN_A_LOOP", KILL)}\n'
        'os.environ["WRITTEN_ONLY"] = "1"\n'
        "h = os.environ.get(some_call())\n")
    reads = environment_reads(tmp_path)
    named = {name for name in reads if not name.startswith("<unresolved")}
    assert named == {"KILL_AFTER", "BY_GETENV", "BY_SUBSCRIPT", "BY_IN", "FROM_ANOTHER_MODULE", "BY_BARE_GETENV",
                     "IN_A_LOOP"}
    assert [name for name in reads if name.startswith("<unresolved")] == [
        "<unresolved some_call() at stages/reader.py:13>"]
