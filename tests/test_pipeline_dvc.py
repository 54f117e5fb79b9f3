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


@pytest.mark.slow
def test_experiments_reuse_the_feature_store(tmp_path):
    repo = DvcRepo(tmp_path, data={"per_class": 6, "val_fraction": 0.2, "test_fraction": 0.2})
    repo.dvc("repro", "extract")
    extract_metrics = tmp_path / "metrics" / "extract.json"
    assert json.loads(extract_metrics.read_text())["computed"] == 60
    repo.run("git", "add", "-A")
    repo.run("git", "commit", "-qm", "baseline")

    out = repo.dvc("exp", "run", "extract", "-S", "heads.logreg.C=[0.1,1]")
    assert "Stage 'extract' didn't change, skipping" in out  # a heads edit never touches the features

    out = repo.dvc("exp", "run", "extract", "-S", "data.val_fraction=0.25")  # a new split, no new image
    assert "Running stage 'prepare'" in out and "Running stage 'extract'" in out
    assert json.loads(extract_metrics.read_text())["computed"] == 0

    out = repo.dvc("exp", "run", "--temp", "extract", "-S", "data.test_fraction=0.25")  # runs in .dvc/tmp/exps
    assert "Running stage 'extract'" in out
    assert f"60 reused from the store {tmp_path / 'data' / 'feature-store'}" in out and ", 0 to compute" in out
    shown = repo.dvc("exp", "show", "--no-pager", "--csv")
    assert "computed" in shown.splitlines()[0]  # exp show lists extract's metrics beside the params
