"""The pipeline as a user drives it: `dvc repro` and `dvc exp run` in a real git + DVC repository.

The whole pipeline runs once per test run (the committed baseline, built by the first test that needs it while the
others wait: tests/longest_first.py starts at most one of them per worker at once); each test below is one use, on a
copy of it. A one-head experiment on the baseline is also run once (`one_head_experiment`): the edits below and
tests/test_reports.py start from it."""
import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import built_once, merged
from tests.dvc_repo import DvcRepo


# a scikit-learn head to edit and a torch head that draws curves (tests/test_reports.py); the other head types are
# trained in tests/test_heads.py and tests/test_predict.py
QUICK_HEADS = {
    "logreg": {"type": "logistic", "C": [0.01, 1.0]},
    "mlp": {"type": "mlp", "hidden": [32], "epochs": 10},
}


def build_baseline(root: Path) -> None:
    """The whole pipeline once on 60 images with the quick heads, committed: what the experiments below start from.
    It excludes the images an empty list names (an edit of the list alone: tests/test_audit.py)."""
    repo = DvcRepo(root, data={"per_class": 6, "val_fraction": 0.2, "test_fraction": 0.2,
                               "exclude": ["data/curation/exclude.csv"]})
    (root / "data" / "curation" / "exclude.csv").write_text("sha256\n")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["heads"] = QUICK_HEADS
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = repo.dvc("repro")
    head_stages = [f"train_heads@{name}" for name in QUICK_HEADS]  # dvc.yaml: one stage per head
    for stage in ("prepare", "download", "export", "extract", *head_stages, "advise", "finetune", "evaluate"):
        assert f"Running stage '{stage}'" in out
    assert json.loads((root / "metrics/extract.json").read_text())["computed"] == 60
    assert json.loads((root / "metrics/finetune.json").read_text())["skipped"] is True
    scores = json.loads((root / "metrics/evaluate.json").read_text())
    assert scores.pop("best") in QUICK_HEADS and set(scores) == set(QUICK_HEADS)
    # `dvc plots show` on these outputs: tests/test_reports.py (every chart) and the fine-tune run below
    repo.run("git", "add", "-A")
    repo.run("git", "commit", "-qm", "baseline")


@pytest.fixture(scope="session")
def baseline(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "pipeline-baseline", build_baseline)


@pytest.fixture
def repo(baseline, tmp_path) -> DvcRepo:
    return DvcRepo.copy_of(baseline, tmp_path / "repo")


ONE_HEAD_EDIT = "heads.logreg.C=[0.1,1]"


def build_one_head_experiment(baseline: Path, root: Path) -> None:
    """`dvc exp run -S heads.logreg.C=[0.1,1]` on a copy of the baseline; its output kept beside the repository."""
    repo = DvcRepo.copy_of(baseline, root / "repo")
    (root / "exp_run.out").write_text(repo.dvc("exp", "run", "-S", ONE_HEAD_EDIT))


@pytest.fixture(scope="session")
def one_head_experiment(baseline, tmp_path_factory) -> Path:
    """The baseline after a one-head experiment (applied to its workspace, as `dvc exp run` does); `exp_run.out`
    beside the repository holds what `dvc exp run` printed."""
    return built_once(tmp_path_factory, "pipeline-one-head-experiment",
                      lambda root: build_one_head_experiment(baseline, root))


def edit_params(repo: DvcRepo, **changes) -> None:
    params_file = repo.root / "params.yaml"
    params_file.write_text(yaml.safe_dump(merged(yaml.safe_load(params_file.read_text()), changes), sort_keys=False))


@pytest.mark.slow
def test_repro_skips_what_did_not_change_and_params_scope_reruns(repo: DvcRepo) -> None:
    # every stage ran once (build_baseline checks it)
    # a typo in a key no stage reads by name and an invalid value, beside an edit prepare reads: check_params (it
    # depends on the whole params.yaml, every stage on its output) runs, names both and stops the repro before any
    # work: prepare does not start
    manifest_before = (repo.root / "data/prepared/manifest.csv").read_bytes()
    edit_params(repo, backbone={"cutt": 14, "arch": "mobilenet_v9"}, data={"per_class": 7})
    out = repo.dvc("repro", check=False)
    assert "backbone.cutt: unknown key" in out and "Running stage 'check_params'" in out
    assert "backbone.arch: 'mobilenet_v9' is not a torchvision classification model" in out
    assert "Running stage" not in out.replace("Running stage 'check_params'", "")
    # the committed params.yaml again, with a comment (a valid edit no stage reads): the check's output, removed
    # when it failed, is written again, the same bytes, and every other stage skips: nothing on the copy of the
    # baseline is stale (that such an edit alone re-runs the check alone, and that nothing is stale after it:
    # tests/test_machine_settings.py)
    repo.run("git", "checkout", "params.yaml")
    params_file = repo.root / "params.yaml"
    params_file.write_text("# a comment\n" + params_file.read_text())
    out = repo.dvc("repro")
    assert "Running stage 'check_params'" in out
    assert "Running stage" not in out.replace("Running stage 'check_params'", "")
    for stage in ("prepare", "download", "export", "extract", "train_heads@logreg", "evaluate"):
        assert f"Stage '{stage}' didn't change, skipping" in out
    assert (repo.root / "data/prepared/manifest.csv").read_bytes() == manifest_before

    # what repro would run (an export costs 10 s): a data edit re-runs prepare only, a pool edit re-exports, no
    # download (neither depends on prepare's outputs: dvc.yaml; that prepare re-runs on an edit of its deps:
    # tests/test_audit.py)
    edit_params(repo, data={"per_class": 7}, backbone={"pool": "max"})
    status = json.loads(repo.run(sys.executable, "-m", "dvc", "status", "--json", "prepare", "download",
                                 "export").stdout)
    assert status == {"prepare": [{"changed deps": {"params.yaml": {"data": "modified"}}}],
                      "export": [{"changed deps": {"params.yaml": {"backbone.pool": "modified"}}}]}


@pytest.mark.slow
def test_edits_and_experiments_reuse_features_rerun_only_what_changed_and_finetune_as_advised(one_head_experiment,
                                                                                             tmp_path) -> None:
    out = (one_head_experiment / "exp_run.out").read_text()  # `dvc exp run -S heads.logreg.C=[0.1,1]`
    assert "Stage 'extract' didn't change, skipping" in out and "Running stage 'train_heads@logreg'" in out
    assert "Stage 'train_heads@mlp' didn't change, skipping" in out  # the other heads are not retrained
    assert "finetune.enabled is false: skipped" in out  # it depends on models/heads: a no-op when disabled

    repo = DvcRepo.copy_of(one_head_experiment / "repo", tmp_path / "repo")
    tmp_path = repo.root
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["heads"]["logreg"]["C"] = [0.1]  # an edit of heads.* in params.yaml, and a head removed
    del params["heads"]["mlp"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = repo.dvc("status")
    assert "train_heads@logreg" in status
    assert "extract" not in status and "evaluate" in status  # evaluate: its param `heads`, which heads there are
    # and, in the same run, fine-tuning as the advisor says (digits: small and unlike ImageNet -> the last 2 blocks),
    # side by side with the heads
    edit_params(repo, finetune={"enabled": True, "unfreeze": "auto", "epochs": 1, "batch_size": 8,
                                "augment": {"hflip": False, "random_resized_crop": False}})
    out = repo.dvc("repro")
    for stage in ("train_heads@logreg", "finetune", "evaluate"):
        assert f"Running stage '{stage}'" in out
    for stage in ("prepare", "download", "export", "extract", "advise"):
        assert f"Stage '{stage}' didn't change, skipping" in out
    assert json.loads((tmp_path / "metrics/heads/logreg.json").read_text())["params"] == {"C": 0.1}
    assert (tmp_path / "models/heads/mlp").is_dir()  # the removed head's stage output stays, and is not evaluated:
    assert set(json.loads((tmp_path / "metrics/evaluate.json").read_text())) == {"logreg", "finetune", "best"}

    advice = json.loads((tmp_path / "metrics/advice.json").read_text())
    finetuned = json.loads((tmp_path / "metrics/finetune.json").read_text())
    assert advice["strategy"] == "partial_finetune" and finetuned["unfreeze"] == advice["unfreeze"] == 2
    timings = json.loads((tmp_path / "reports/timings/finetune.json").read_text())
    assert {"seconds", "epoch_seconds"}.issubset(timings) and not [key for key in finetuned if "seconds" in key]
    assert "| finetune" in (tmp_path / "reports/summary.md").read_text()
    plots = repo.dvc("plots", "show")  # the dvclive curves under plots/ and the confusion files
    assert "failed" not in plots.lower()
    # a new split run outside the workspace: the queued sweep below


@pytest.mark.slow
def test_a_queued_sweep_runs_each_experiment_and_exp_show_lists_them(repo: DvcRepo) -> None:
    """Each queued experiment changes one thing on the baseline: a head (the logreg head and evaluate re-run), or
    the split (`extract` as the target: prepare and extract re-run). Both run in a copy under .dvc/tmp/exps."""
    repo.dvc("exp", "run", "--queue", "-S", "heads.logreg.C=[0.1]")
    repo.dvc("exp", "run", "--queue", "-n", "new-split", "extract",
             "-S", "data.val_fraction=0.25", "-S", "data.test_fraction=0.25")
    # waits for the queue; exits 0 even if one failed: `exp show` below finds both, each with its metrics
    repo.dvc("exp", "run", "--run-all", "-j", "1")

    # a new split, no new image: prepare and extract re-run and compute nothing, with the workspace's store
    out = repo.dvc("queue", "logs", "new-split")
    assert "Running stage 'prepare'" in out and "Running stage 'extract'" in out
    assert f"60 reused from the store {repo.root / 'data' / 'feature-store'}" in out and ", 0 to compute" in out

    shown = json.loads(repo.run(sys.executable, "-m", "dvc", "exp", "show", "--json").stdout)
    experiments = [e for commit in shown for e in (commit.get("experiments") or [])]
    changed = set()
    for experiment in experiments:
        data = experiment["revs"][0]["data"]
        assert experiment["executor"] is None or experiment["executor"]["state"] == "success"
        metrics = data["metrics"]
        assert "accuracy" in metrics["metrics/evaluate.json"]["data"]["logreg"]
        assert metrics["metrics/prepare.json"]["data"]["images"] == 60
        assert metrics["metrics/export.json"]["data"]["feature_dim"] == 1280
        params = data["params"]["params.yaml"]["data"]
        changed.add((str(params["heads"]["logreg"]["C"]), params["data"]["val_fraction"],
                     metrics["metrics/extract.json"]["data"]["computed"]))
    # the baseline's logreg C is [0.01, 1.0], its val_fraction 0.2, its extract computed 60
    assert changed == {("[0.1]", 0.2, 60), ("[0.01, 1.0]", 0.25, 0)} and len(experiments) == 2
    # the same table as CSV: tests/test_reports.py
