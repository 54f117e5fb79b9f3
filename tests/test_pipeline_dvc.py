"""The pipeline as a user drives it: `dvc repro` in a real git + DVC repository."""
import json
import sys

import pytest

from tests.dvc_repo import DvcRepo


@pytest.mark.slow
def test_repro_runs_then_skips_and_params_scope_reruns(tmp_path):
    repo = DvcRepo(tmp_path, data={"per_class": 8})
    out = repo.dvc("repro", "prepare", "export")
    for stage in ("prepare", "download", "export"):
        assert f"Running stage '{stage}'" in out

    again = repo.dvc("repro", "prepare", "export")
    assert "Running stage" not in again
    for stage in ("prepare", "download", "export"):
        assert f"Stage '{stage}' didn't change, skipping" in again

    metrics = json.loads(repo.run(sys.executable, "-m", "dvc", "metrics", "show", "--json").stdout)
    files = metrics[""]["data"]
    assert files["metrics/prepare.json"]["data"]["images"] == 80
    assert files["metrics/export.json"]["data"]["feature_dim"] == 1280

    repo.set_params(data={"per_class": 9})  # a data edit re-runs prepare only
    out = repo.dvc("repro", "prepare", "export")
    assert "Running stage 'prepare'" in out
    assert "Stage 'download' didn't change, skipping" in out
    assert "Stage 'export' didn't change, skipping" in out

    repo.set_params(data={"per_class": 9}, backbone={"pool": "max"})  # a pool edit re-exports, no download
    out = repo.dvc("repro", "prepare", "export")
    assert "Running stage 'export'" in out
    assert "Stage 'download' didn't change, skipping" in out


@pytest.mark.slow
def test_bad_params_fail_before_any_work(tmp_path):
    repo = DvcRepo(tmp_path, backbone={"arch": "mobilenet_v9"})
    out = repo.dvc("repro", "prepare", "export", check=False)
    assert "backbone.arch: 'mobilenet_v9' is not a torchvision classification model" in out
    assert not (tmp_path / "data" / "prepared" / "manifest.csv").exists()
