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


@pytest.mark.slow
def test_bad_params_fail_before_any_work(tmp_path):
    repo = DvcRepo(tmp_path, backbone={"arch": "mobilenet_v9"})
    out = repo.dvc("repro", "prepare", "export", check=False)
    assert "backbone.arch: 'mobilenet_v9' is not a torchvision classification model" in out
    assert not (tmp_path / "data" / "prepared" / "manifest.csv").exists()


QUICK_HEADS = {
    "logreg": {"type": "logistic", "C": [0.01, 1.0]},
    "mlp": {"type": "mlp", "hidden": [32], "epochs": 10},
    "knn": {"type": "sklearn", "estimator": "sklearn.neighbors.KNeighborsClassifier", "grid": {"n_neighbors": [3]}},
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
    # `dvc plots show` on these outputs: tests/test_reports.py (every chart) and the fine-tune experiment below
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
    again = repo.dvc("repro")
    assert "Running stage" not in again
    for stage in ("prepare", "download", "export", "extract", "train_heads@logreg", "evaluate"):
        assert f"Stage '{stage}' didn't change, skipping" in again

    # a typo in a key no stage reads by name, beside an edit prepare reads: check_params (it depends on the whole
    # params.yaml, every stage on its output) runs and stops the repro on it, before any work: prepare does not start
    manifest_before = (repo.root / "data/prepared/manifest.csv").read_bytes()
    edit_params(repo, backbone={"cutt": 14}, data={"per_class": 7})
    out = repo.dvc("repro", check=False)
    assert "backbone.cutt: unknown key" in out and "Running stage 'check_params'" in out
    assert "Running stage" not in out.replace("Running stage 'check_params'", "")
    # the committed params.yaml again, with a comment (a valid edit no stage reads): the check's output, removed
    # when it failed, is written again, the same bytes, and nothing else runs (that such an edit alone re-runs the
    # check alone: tests/test_machine_settings.py)
    repo.run("git", "checkout", "params.yaml")
    params_file = repo.root / "params.yaml"
    params_file.write_text("# a comment\n" + params_file.read_text())
    out = repo.dvc("repro")
    assert "Running stage 'check_params'" in out
    assert "Running stage" not in out.replace("Running stage 'check_params'", "")
    assert (repo.root / "data/prepared/manifest.csv").read_bytes() == manifest_before

    metrics = json.loads(repo.run(sys.executable, "-m", "dvc", "metrics", "show", "--json").stdout)
    files = metrics[""]["data"]
    assert files["metrics/prepare.json"]["data"]["images"] == 60
    assert files["metrics/export.json"]["data"]["feature_dim"] == 1280

    edit_params(repo, data={"per_class": 7})  # a data edit re-runs prepare only
    out = repo.dvc("repro", "prepare", "export")
    assert "Running stage 'prepare'" in out
    assert "Stage 'download' didn't change, skipping" in out
    assert "Stage 'export' didn't change, skipping" in out

    edit_params(repo, backbone={"pool": "max"})  # a pool edit re-exports, no download
    status = repo.dvc("status", "download", "export")  # what repro would run (an export costs 10 s)
    assert "export:" in status and "backbone.pool" in status and "download:" not in status


@pytest.mark.slow
def test_edits_and_experiments_reuse_features_and_rerun_only_what_changed(one_head_experiment, tmp_path) -> None:
    out = (one_head_experiment / "exp_run.out").read_text()  # `dvc exp run -S heads.logreg.C=[0.1,1]`
    assert "Stage 'extract' didn't change, skipping" in out and "Running stage 'train_heads@logreg'" in out
    assert "Stage 'train_heads@mlp' didn't change, skipping" in out

    repo = DvcRepo.copy_of(one_head_experiment / "repo", tmp_path / "repo")
    tmp_path = repo.root
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["heads"]["logreg"]["C"] = [0.1]  # an edit of heads.* in params.yaml, and a head removed
    del params["heads"]["knn"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = repo.dvc("status")
    assert "train_heads@logreg" in status and "train_heads@mlp" not in status
    assert "extract" not in status and "evaluate" in status  # evaluate: its param `heads`, which heads there are
    out = repo.dvc("repro")
    assert "Running stage 'train_heads@logreg'" in out and "Running stage 'evaluate'" in out
    for stage in ("prepare", "download", "export", "extract", "train_heads@mlp"):
        assert f"Stage '{stage}' didn't change, skipping" in out  # the other heads are not retrained
    assert "finetune.enabled is false: skipped" in out  # it depends on models/heads: a no-op when disabled
    assert json.loads((tmp_path / "metrics/heads/logreg.json").read_text())["params"] == {"C": 0.1}
    assert (tmp_path / "models/heads/knn").is_dir()  # the removed head's stage output stays, and is not evaluated:
    assert set(json.loads((tmp_path / "metrics/evaluate.json").read_text())) == {"logreg", "mlp", "best"}
    # a new split run outside the workspace: the queued sweep below


@pytest.mark.slow
def test_a_queued_sweep_runs_each_experiment_and_exp_show_lists_them(repo: DvcRepo) -> None:
    """Each queued experiment changes one thing on the baseline: a head (the knn head and evaluate re-run), or the
    split (`extract` as the target: prepare and extract re-run). Both run in a copy under .dvc/tmp/exps."""
    repo.dvc("exp", "run", "--queue", "-S", "heads.knn.grid.n_neighbors=[1]")
    repo.dvc("exp", "run", "--queue", "-n", "new-split", "extract",
             "-S", "data.val_fraction=0.25", "-S", "data.test_fraction=0.25")
    repo.dvc("exp", "run", "--run-all", "-j", "1")  # waits for the queue; exits 0 even if one failed, so:
    assert "Failed" not in repo.dvc("queue", "status")

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
        assert "accuracy" in data["metrics"]["metrics/evaluate.json"]["data"]["logreg"]
        params = data["params"]["params.yaml"]["data"]
        changed.add((str(params["heads"]["knn"]["grid"]["n_neighbors"]), params["data"]["val_fraction"],
                     data["metrics"]["metrics/extract.json"]["data"]["computed"]))
    # the baseline's knn is [3], its val_fraction 0.2, its extract computed 60
    assert changed == {("[1]", 0.2, 60), ("[3]", 0.25, 0)} and len(experiments) == 2
    shown = repo.dvc("exp", "show", "--no-pager", "--csv")
    assert "logreg.accuracy" in shown.splitlines()[0] and "computed" in shown.splitlines()[0]


@pytest.mark.slow
def test_a_finetune_experiment_follows_the_advice_and_is_reported_beside_the_heads(repo: DvcRepo) -> None:
    tmp_path = repo.root
    # fine-tuning as the advisor says (digits: small and unlike ImageNet -> the last 2 blocks), side by side
    out = repo.dvc("exp", "run", "-S", "finetune.enabled=true", "-S", "finetune.unfreeze=auto", "-S",
                   "finetune.epochs=1", "-S", "finetune.batch_size=8", "-S", "finetune.augment.hflip=false",
                   "-S", "finetune.augment.random_resized_crop=false")
    assert "Running stage 'finetune'" in out and "Running stage 'evaluate'" in out
    assert "Stage 'extract' didn't change, skipping" in out
    advice = json.loads((tmp_path / "metrics/advice.json").read_text())
    finetuned = json.loads((tmp_path / "metrics/finetune.json").read_text())
    assert advice["strategy"] == "partial_finetune" and finetuned["unfreeze"] == advice["unfreeze"] == 2
    timings = json.loads((tmp_path / "reports/timings/finetune.json").read_text())
    assert {"seconds", "epoch_seconds"}.issubset(timings) and not [key for key in finetuned if "seconds" in key]
    assert "finetune" in json.loads((tmp_path / "metrics/evaluate.json").read_text())
    assert "| finetune" in (tmp_path / "reports/summary.md").read_text()
    plots = repo.dvc("plots", "show")  # the dvclive curves under plots/ and the confusion files
    assert "failed" not in plots.lower()
