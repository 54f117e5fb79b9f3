"""Shared fixtures: a temp project folder with a params.yaml, and tiny real image files."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def merged(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class Project:
    """A temp working directory that the stages run in, as DVC runs them from the project root."""

    def __init__(self, root: Path):
        self.root = root

    def params(self, **sections) -> dict:
        params = merged(DEFAULT_PARAMS, sections)
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        return params


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    monkeypatch.chdir(tmp_path)
    project = Project(tmp_path)
    project.params()
    return project
