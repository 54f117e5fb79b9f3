"""The docs say what the code does: docs/params.md documents exactly the keys of transfer_learning/params.py, with
their defaults; README.md stays a short guide; every file path the docs name exists; no file cites an issue number
or a design file outside the repository."""
from __future__ import annotations

import math
import re
import subprocess
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from transfer_learning.params import Params, ParamsLoader

ROOT = Path(__file__).resolve().parent.parent
PARAMS_DOC = ROOT / "docs" / "params.md"
README = ROOT / "README.md"
GUIDES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
README_MAX_LINES = 250
REQUIRED = "required"  # what docs/params.md writes in the default column of a key without a default
HEAD_KEY = "<name>"  # how docs/params.md writes the head name in heads.<name>.<key>

KEY_ROW = re.compile(r"^\|\s*`(?P<key>[A-Za-z_][\w.<>]*)`\s*\|")
HEAD_TYPE_HEADING = re.compile(r"^#+ .*`type: (?P<type>\w+)`")


# ---- the keys the code has --------------------------------------------------------------------------------------

def _strip_annotated(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _model_members(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field holds directly, or as the values of a dict (a discriminated union of them)."""
    annotation = _strip_annotated(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) is dict:
        value = _strip_annotated(typing.get_args(annotation)[1])
        members = [_strip_annotated(m) for m in typing.get_args(value)] or [value]
        if all(isinstance(m, type) and issubclass(m, BaseModel) for m in members):
            return members
    return []


def _default(field: Any) -> Any:
    if field.default_factory is not None:
        return field.default_factory()
    return field.default


def code_keys(model: type[BaseModel] = Params, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Section ('' for ordinary keys, or a head type) -> dotted key -> default (PydanticUndefined when required).
    A field holding a model is walked into; a dict of models (heads) gives `heads.<name>.<key>` per model type."""
    found: dict[str, dict[str, Any]] = {}
    for name, field in model.model_fields.items():
        members = _model_members(field.annotation)
        dict_of_models = typing.get_origin(_strip_annotated(field.annotation)) is dict
        if members and not dict_of_models:
            for section, keys in code_keys(members[0], f"{prefix}{name}.").items():
                found.setdefault(section, {}).update(keys)
        elif members:
            for member in members:
                head_type = typing.get_args(member.model_fields["type"].annotation)[0]
                keys = {f"{prefix}{name}.{HEAD_KEY}.{k}": _default(f) for k, f in member.model_fields.items()}
                found.setdefault(head_type, {}).update(keys)
        else:
            found.setdefault("", {})[f"{prefix}{name}"] = _default(field)
    return found


# ---- the keys docs/params.md has ---------------------------------------------------------------------------------

def doc_rows(text: str) -> dict[str, dict[str, list[str]]]:
    """Section ('' or the head type of the `type: X` heading above) -> key -> the row's cells after the key (default,
    valid values, read by), from the tables' rows whose first cell is one backticked key. A key documented twice in
    one section is kept twice (as key#2)."""
    found: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("#"):
            heading = HEAD_TYPE_HEADING.match(line)
            section = heading["type"] if heading else ""
            continue
        row = KEY_ROW.match(line)
        if row:
            keys = found.setdefault(section, {})
            key = row["key"]
            while key in keys:
                key += "#2"
            keys[key] = [cell.strip() for cell in line.strip().strip("|").split(" | ")[1:]]
    return found


def doc_keys(text: str) -> dict[str, dict[str, str]]:
    """Section -> key -> the default cell."""
    return {section: {key: cells[0] for key, cells in keys.items()} for section, keys in doc_rows(text).items()}


def _parsed_default(cell: str) -> Any:
    """The default a cell documents: `required`, or the YAML value inside its first backticks."""
    if cell == REQUIRED:
        return PydanticUndefined
    value = re.match(r"`([^`]*)`", cell)
    assert value, f"a default cell should be `value` or {REQUIRED}, got {cell!r}"
    return yaml.load(value[1], Loader=ParamsLoader)


def _as_data(value: Any) -> Any:
    return value.model_dump() if isinstance(value, BaseModel) else value


def _same(documented: Any, actual: Any) -> bool:
    actual = _as_data(actual)
    if isinstance(actual, list) and isinstance(documented, list):
        return len(actual) == len(documented) and all(map(_same, documented, actual))
    if isinstance(actual, float) and isinstance(documented, (int, float)) and not isinstance(documented, bool):
        return math.isclose(documented, actual, rel_tol=1e-12)
    return type(documented) is type(actual) and documented == actual


def test_docs_params_documents_every_key_of_params_py_and_no_other():
    documented = doc_keys(PARAMS_DOC.read_text())
    actual = code_keys()
    problems = []
    for section in sorted(set(documented) | set(actual)):
        where = f"heads of type {section}" if section else "params"
        doc, code = documented.get(section, {}), actual.get(section, {})
        problems += [f"{where}: {key} is in transfer_learning/params.py but not in docs/params.md"
                     for key in sorted(set(code) - set(doc))]
        problems += [f"{where}: docs/params.md documents {key.removesuffix('#2')}"
                     + (" twice" if key.endswith("#2") else ", which transfer_learning/params.py does not have")
                     for key in sorted(set(doc) - set(code))]
    assert not problems, "\n".join(problems)


def test_docs_params_gives_the_code_defaults():
    documented = doc_keys(PARAMS_DOC.read_text())
    wrong = []
    for section, keys in code_keys().items():
        for key, default in keys.items():
            cell = documented.get(section, {}).get(key)
            if cell is not None and not _same(_parsed_default(cell), default):
                wrong.append(f"{key} ({section or 'params'}): docs/params.md says {cell}, the code's default is "
                             f"{_as_data(default)!r}")
    assert not wrong, "\n".join(wrong)


def test_the_key_walk_sees_nested_sections_and_every_head_type():
    keys = code_keys()
    assert {"data.source", "extract.ray.address", "finetune.augment.hflip", "layers.adopt"} <= set(keys[""])
    assert not any(key.startswith("heads") for key in keys[""])
    assert {"logistic", "linear", "mlp", "sklearn"} <= set(keys)
    assert "heads.<name>.estimator" in keys["sklearn"] and keys["sklearn"]["heads.<name>.estimator"] is PydanticUndefined
    assert "heads.<name>.hidden" in keys["mlp"] and "heads.<name>.hidden" not in keys["linear"]


def test_a_missing_an_extra_and_a_wrong_default_are_each_found():
    text = PARAMS_DOC.read_text()
    assert "| `data.seed` | `0` |" in text and "| `layers.adopt` | `best` |" in text
    edited = (text.replace("| `data.seed` | `0` |", "| `data.seeds` | `0` |")
              .replace("| `layers.adopt` | `best` |", "| `layers.adopt` | `all` |"))
    documented = doc_keys(edited)
    assert "data.seed" not in documented[""] and "data.seeds" in documented[""]
    assert not _same(_parsed_default(documented[""]["layers.adopt"]), code_keys()[""]["layers.adopt"])
    assert _same(_parsed_default("`1.0e-4`"), 1e-4) and not _same(_parsed_default("`1`"), True)


MACHINE = "(machine)"  # how docs/params.md marks a setting that cannot change a result


def declared_params() -> set[str]:
    """Every params entry a stage of dvc.yaml declares, a foreach stage's ${key} written as <name>."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {str(entry).replace("${key}", HEAD_KEY) for stage in stages.values()
            for entry in stage.get("do", stage).get("params", [])}


def _declared(key: str, entries: set[str]) -> bool:
    return any(key == entry or key.startswith(entry + ".") for entry in entries)


def test_machine_settings_are_the_keys_no_stage_declares():
    """docs/params.md marks a key (machine) exactly when no stage of dvc.yaml declares it: changing it re-runs
    nothing, and every other key re-runs the stages that read it."""
    entries = declared_params()
    wrong = []
    for section, keys in doc_rows(PARAMS_DOC.read_text()).items():
        for key, cells in keys.items():
            machine = MACHINE in cells[-1]
            if machine and _declared(key, entries):
                wrong.append(f"{key}: docs/params.md says {MACHINE}, but a stage in dvc.yaml declares it")
            elif not machine and not _declared(key, entries):
                wrong.append(f"{key}: no stage in dvc.yaml declares it; docs/params.md should mark it {MACHINE}")
    assert not wrong, "\n".join(wrong)


# ---- README and the guides ---------------------------------------------------------------------------------------

def test_readme_is_a_short_guide():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; reference belongs in docs/"
    assert lines[0].startswith("# ")
    commands = "\n".join(lines[:12])
    assert "make run" in commands and "make test" in commands, "the README starts with make run and make test"


# a repository path written in backticks or as a link target: top folder, then at least one more part
REPO_PATH = re.compile(r"(?<![\w./<-])((?:stages|transfer_learning|benchmarks|tests|docs)/[\w./-]*\w)")
LINK = re.compile(r"\]\((?!https?://|#)([^)#\s]+)")


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_a_guide_names_exists(guide: Path):
    text = guide.read_text()
    named = {match for span in re.findall(r"`([^`]+)`", text) for match in REPO_PATH.findall(span)}
    missing = sorted(path for path in named if not (ROOT / path).exists())
    missing += sorted(link for link in LINK.findall(text) if not (guide.parent / link).exists())
    scripts = set(re.findall(r"python -m stages\.(\w+)", text))
    missing += sorted(f"stages/{s}.py" for s in scripts if not (ROOT / "stages" / f"{s}.py").exists())
    assert not missing, f"{guide.relative_to(ROOT)} names what does not exist: {missing}"


def test_every_benchmark_is_in_benchmarks_readme():
    text = (ROOT / "benchmarks" / "README.md").read_text()
    helpers = {"timing.py", "stage_process.py"}  # imported by the benchmarks, measure nothing themselves
    scripts = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name not in helpers)
    assert scripts and not [s for s in scripts if f"benchmarks/{s}" not in text]


# ---- no file points outside the repository -----------------------------------------------------------------------

# a design file kept outside the repository (docs/design.md is the repository's own), an issue tracker's numbers
OUTSIDE_REFERENCE = re.compile(r"DESIGN\.md|(?i:\bissue [0-9]+|\bissue[']s|\(issue\b)")
NOT_PROSE = {"tests/durations.json"}  # test ids and seconds


def test_no_file_cites_an_issue_or_a_design_file_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode:
        pytest.skip("not a git checkout")
    cited = []
    for name in tracked.stdout.split("\0"):
        path = ROOT / name
        if not name or name in NOT_PROSE or name.startswith("data/") or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        cited += [f"{name}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1)
                  if OUTSIDE_REFERENCE.search(line) and path != Path(__file__)]
    assert not cited, "\n".join(cited)
