"""`python -m stages.store gc` deletes nothing it cannot prove unreferenced: when git, DVC's cache or a metrics
file cannot be read for a revision it consults, it stops, names the cause and deletes nothing; and it keeps the
rows a layer sweep's metrics/layers.json names (every block's, the adopted cut's) wherever that file is."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages import store as store_cli
from tests.conftest import built_once
from tests.dvc_repo import DvcRepo
from tests.test_layers import SWEPT, swept, work  # noqa: F401 (fixtures: one real sweep of SWEPT's blocks)
from tests.test_store_cli import age, extract_stub, fill, fp, run
from transfer_learning.common.errors import UserError
from transfer_learning.features.fingerprint import read_about
from transfer_learning.features.store import FeatureStore

STORE = Path("data/feature-store")


def build_history(root: Path) -> None:
    """A git + DVC repo whose last commit alone refers to fp-head: through dvc.lock (data/features in DVC's cache)
    and metrics/extract.json. The workspace has moved on: it has none of data/features, dvc.lock and metrics."""
    repo = DvcRepo(root)
    (root / "extract_stub.py").write_text(extract_stub())
    (root / "dvc.yaml").write_text(
        "stages:\n  extract:\n    cmd: python extract_stub.py\n    deps: [extract_stub.py]\n"
        "    params: [fingerprint]\n    outs: [data/features]\n")
    (root / "params.yaml").write_text(f"fingerprint: '{fp('fp-head')}'\n")
    repo.dvc("repro")
    (root / "metrics").mkdir()
    (root / "metrics" / "extract.json").write_text(json.dumps({"fingerprint": fp("fp-head")}))
    repo.run("git", "add", "-A")
    repo.run("git", "commit", "-qm", "fp-head")
    shutil.rmtree(root / "data" / "features")
    (root / "dvc.lock").unlink()
    (root / "metrics" / "extract.json").unlink()


@pytest.fixture
def history(tmp_path_factory, tmp_path, monkeypatch) -> DvcRepo:
    """A private copy of the history above as the working directory, its store holding fp-head and fp-unused (both
    last used 30 days ago); git reads only the test's own config (no `safe.directory` from the machine)."""
    (tmp_path / "gitconfig").write_text("[user]\n    name = test\n    email = test@example.com\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    repo = DvcRepo.copy_of(built_once(tmp_path_factory, "gc-history", build_history), tmp_path / "repo")
    monkeypatch.chdir(repo.root)
    for name in ("fp-head", "fp-unused"):
        fill(STORE, name, age_days=30)
    return repo


def store_entries() -> list[str]:
    return sorted(str(p.relative_to(STORE)) for p in STORE.rglob("*"))


def test_gc_keeps_what_the_last_commit_refers_to_when_git_can_read_it(history, capsys):
    status, out = run(capsys, "gc", "--store", str(STORE), "--days", "0")
    assert status == 0
    assert f"keep          {fp('fp-head')}: commit" in out
    assert not (STORE / fp("fp-unused")).exists() and (STORE / fp("fp-head")).exists()


def blob_of(repo: DvcRepo, path: str) -> Path:
    oid = repo.run("git", "rev-parse", f"HEAD:{path}").stdout.strip()
    return repo.root / ".git" / "objects" / oid[:2] / oid[2:]


def dubious_ownership(repo: DvcRepo, monkeypatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("handing the checkout to another user needs root")
    monkeypatch.delenv("SUDO_UID", raising=False)  # git would take root for that user
    for path in (repo.root, repo.root / ".git"):
        os.chown(path, 54321, 54321)


def damaged_head(repo: DvcRepo, monkeypatch) -> None:
    (repo.root / ".git" / "HEAD").write_text("not a ref\n")


def git_dir_nowhere(repo: DvcRepo, monkeypatch) -> None:
    monkeypatch.setenv("GIT_DIR", str(repo.root.parent / "nowhere"))


def object_missing(repo: DvcRepo, monkeypatch) -> None:
    blob_of(repo, "metrics/extract.json").unlink()


def metrics_not_json(repo: DvcRepo, monkeypatch) -> None:
    (repo.root / "metrics" / "extract.json").write_text('{"fingerprint": ')
    repo.run("git", "add", "metrics/extract.json")
    repo.run("git", "commit", "-qm", "a metrics file cut short")
    (repo.root / "metrics" / "extract.json").unlink()


def cache_listing_damaged(repo: DvcRepo, monkeypatch) -> None:
    md5 = yaml.safe_load(repo.run("git", "show", "HEAD:dvc.lock").stdout)["stages"]["extract"]["outs"][0]["md5"]
    listing = repo.root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    listing.chmod(0o644)  # DVC leaves its cache read-only
    listing.write_text("[{\"relpath\": ")


@pytest.mark.parametrize("damage, cause", [
    (dubious_ownership, "fatal: detected dubious ownership in repository"),
    (damaged_head, "fatal: not a git repository"),
    (git_dir_nowhere, "fatal: not a git repository: '.*nowhere'"),
    (object_missing, "commit [0-9a-f]{8}: git lacks the object of metrics/extract.json"),
    (metrics_not_json, "commit [0-9a-f]{8}: metrics/extract.json is not JSON"),
    (cache_listing_damaged, r"commit [0-9a-f]{8}: DVC's cache: .*, the listing of data/features \(md5 .*\), cannot be "
                            "read"),
], ids=["dubious-ownership", "damaged-HEAD", "GIT_DIR-nowhere", "object-missing", "metrics-not-JSON",
        "cache-listing-damaged"])
def test_gc_deletes_nothing_and_names_the_cause_when_it_cannot_read_what_a_revision_refers_to(history, monkeypatch,
                                                                                            damage, cause):
    damage(history, monkeypatch)
    before = store_entries()
    for argv in (["gc", "--store", str(STORE), "--days", "0"], ["gc", "--store", str(STORE), "--days", "0",
                                                                  "--dry-run"]):
        with pytest.raises(UserError, match=f"(?s)gc stopped and deleted nothing.*{cause}"):
            store_cli.main(argv)
    assert store_entries() == before


def test_without_git_on_path_gc_exits_non_zero_naming_it(history):
    """The real command line, its PATH an empty folder."""
    nothing = history.root.parent / "bin"
    nothing.mkdir()
    before = store_entries()
    result = subprocess.run([sys.executable, "-m", "stages.store", "gc", "--store", str(STORE), "--days", "0"],
                            text=True, capture_output=True, env={**os.environ, "PATH": str(nothing)})
    assert result.returncode == 2, result.stderr
    assert "git is not on PATH" in result.stderr and "Traceback" not in result.stderr
    assert store_entries() == before


def test_a_fifo_among_the_split_files_stops_gc_naming_it_instead_of_hanging_it(history):
    """Opening a FIFO blocks until something writes to it: the real command line, in its own process with a
    timeout, so that a regression fails here instead of hanging the suite."""
    Path("data/features").mkdir(parents=True)
    os.mkfifo("data/features/train.h5")
    before = store_entries()
    result = subprocess.run([sys.executable, "-m", "stages.store", "gc", "--store", str(STORE), "--days", "0"],
                            text=True, capture_output=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "gc stopped and deleted nothing" in result.stderr
    assert "workspace: data/features/train.h5 is a FIFO, socket or device, not a split file" in result.stderr
    assert store_entries() == before


def test_force_goes_on_with_what_could_be_read_and_says_what_it_could_not(history, monkeypatch, capsys):
    git_dir_nowhere(history, monkeypatch)
    status, out = run(capsys, "gc", "--store", str(STORE), "--days", "0", "--force")
    assert status == 0
    assert "warning: --force: going on although git cannot read this checkout's history" in out
    assert not (STORE / fp("fp-head")).exists()  # what --force is documented to risk


def test_a_layer_sweeps_rows_are_kept_while_its_metrics_name_them_in_the_workspace_a_commit_or_an_experiment(
        work, capsys):
    """One real sweep (SWEPT's blocks, the best adopted as a `backbone.cut` folder): metrics/layers.json names
    every folder gc must keep."""
    metrics = json.loads(Path("metrics/layers.json").read_text())
    blocks = metrics["block_fingerprints"]
    adopted = {record["fingerprint"] for record in metrics["adopted"].values()}
    assert sorted(blocks) == [str(b) for b in SWEPT] and len(adopted) == 1
    sweep_folders = {Path("store") / name for name in [*blocks.values(), *adopted]}
    assert {p for p in Path("store").iterdir() if p.is_dir()} == sweep_folders
    assert all(read_about(Path("store") / blocks[b])["rows"] == "layer sweep block" for b in blocks)
    unused = fill(Path("store"), "unused")
    Path("dvc.yaml").write_text("stages: {}\n")
    git = [["init", "-q"], ["config", "user.email", "t@example.com"], ["config", "user.name", "t"],
           ["add", "dvc.yaml"], ["commit", "-qm", "project"]]
    for args in git:
        subprocess.run(["git", *args], check=True)

    def collect() -> dict[str, str]:
        for folder in [*sweep_folders, unused]:
            if folder.exists():
                age(folder, 30)
        status, out = run(capsys, "gc", "--store", "store", "--days", "0")
        assert status == 0
        return {line.split()[1].rstrip(":"): line for line in out.splitlines() if line.startswith(("keep", "delete"))}

    said = collect()  # the workspace's metrics
    first, last = (str(b) for b in SWEPT)
    assert f"workspace (layer sweep block {first})" in said[blocks[first]]
    assert f"(layer sweep block {last})" in said[blocks[last]]
    assert "adopted for `backbone.cut:" in said[next(iter(adopted))]
    assert not unused.exists()

    subprocess.run(["git", "add", "metrics/layers.json"], check=True)
    subprocess.run(["git", "commit", "-qm", "sweep"], check=True)
    Path("metrics/layers.json").write_text(json.dumps({"enabled": False}))  # a later run with the sweep off
    said = collect()
    assert all(said[folder.name].split()[2] == "commit" for folder in sweep_folders), said

    # the sweep as a DVC experiment stores it: a commit under refs/exps, no branch leading to it
    subprocess.run(["git", "update-ref", "refs/exps/aa/bbbb/sweep-exp", "HEAD"], check=True)
    subprocess.run(["git", "reset", "-q", "--soft", "HEAD~1"], check=True)
    said = collect()
    assert all("experiment sweep-exp" in said[folder.name] for folder in sweep_folders), said
    for folder in sweep_folders:
        with FeatureStore.existing(folder) as kept:
            assert len(kept) == metrics["images"]

    subprocess.run(["git", "update-ref", "-d", "refs/exps/aa/bbbb/sweep-exp"], check=True)
    said = collect()  # nothing refers to the sweep any more
    assert all(said[str(folder)].startswith("delete") for folder in sweep_folders) and not any(
        folder.exists() for folder in sweep_folders)


def test_a_sweep_whose_metrics_do_not_name_its_blocks_stops_gc(work):
    metrics = json.loads(Path("metrics/layers.json").read_text())
    del metrics["block_fingerprints"]  # as sweeps wrote it before gc read them
    Path("metrics/layers.json").write_text(json.dumps(metrics))
    Path("dvc.yaml").write_text("stages: {}\n")
    subprocess.run(["git", "init", "-q"], check=True)
    before = sorted(Path("store").rglob("*"))
    with pytest.raises(UserError, match="workspace: metrics/layers.json records a layer sweep but not the store "
                                        "folders of its blocks' rows"):
        store_cli.main(["gc", "--store", "store", "--days", "0"])
    assert sorted(Path("store").rglob("*")) == before
