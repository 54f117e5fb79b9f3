"""python -m stages.store list | verify | gc on real stores, gc in a real git + DVC repository."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from filelock import FileLock

from stages import store as store_cli
from tests.dvc_repo import DvcRepo
from tests.test_feature_store import data_offset, flip, write_legacy
from transfer_learning.common.errors import UserError
from transfer_learning.features.store import FeatureStore, store_key

DIM = 8
DAY = 86400


def fill(root: Path, fingerprint: str, rows: int = 3, files: int = 1, age_days: float = 0) -> Path:
    """A fingerprint folder with `files` real store files, last used `age_days` ago."""
    with FeatureStore(root, fingerprint, DIM) as store:
        for f in range(files):
            keys = [store_key(f"{f * 1000 + i:064x}", "0") for i in range(rows)]
            store.add(keys, np.ones((rows, DIM), np.float32))
            store.commit()
    age(root / fingerprint, age_days)
    return root / fingerprint


def age(path: Path, days: float) -> None:
    then = time.time() - days * DAY
    os.utime(path, (then, then))


def megabytes(folder: Path) -> str:
    return f"{sum(f.stat().st_size for f in folder.iterdir()) / 1e6:.1f}"


def run(capsys, *argv: str) -> tuple[int, str]:
    status = store_cli.main(list(argv))
    return status, capsys.readouterr().out


def test_list_shows_rows_size_files_and_last_use(tmp_path, capsys):
    store = tmp_path / "store"
    fill(store, "fp-a", rows=4, files=2)
    fill(store, "fp-b", rows=5, age_days=3)
    (store / "finetune" / "run-1").mkdir(parents=True)
    (store / "finetune" / "run-1" / "checkpoint.pt").write_bytes(b"x" * 2_000_000)
    status, out = run(capsys, "list", "--store", str(store))
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:-1]}
    assert status == 0
    assert lines["fp-a"][1:4] == ["8", megabytes(store / "fp-a"), "2"]
    assert lines["fp-b"][1:4] == ["5", megabytes(store / "fp-b"), "1"]
    assert lines["fp-b"][5] == time.strftime("%Y-%m-%d", time.localtime(time.time() - 3 * DAY))
    assert lines["finetune/run-1"][1:4] == ["-", "2.0", "1"]


def test_verify_names_and_moves_aside_bad_files_stamps_legacy_ones_and_counts_as_no_use(tmp_path, capsys):
    store = tmp_path / "store"
    good = fill(store, "fp-good", files=2, age_days=20)
    bad = fill(store, "fp-bad", files=2, age_days=20)
    victim = sorted(bad.glob("*.h5"))[0]
    flip(victim, data_offset(victim, "features", 1, 3))
    keys = [store_key(f"{i:064x}", "0") for i in range(3)]
    write_legacy(store / "fp" / "base-1.h5", keys, np.ones((3, DIM), np.float32))
    age(store / "fp", 20)

    status, out = run(capsys, "verify", "--store", str(store))
    assert status == 1
    assert f"BAD      {victim}: fails its checksum" in out
    assert f"stamped  {store / 'fp' / 'base-1.h5'}" in out
    assert "ok       fp-good: 6 rows in 2 file(s)" in out and "ok       fp-bad: 3 rows in 1 file(s)" in out
    assert "verified 5 file(s)" in out and ": 1 bad" in out
    assert not victim.exists() and list(bad.glob(f"{victim.stem}.rejected-*"))
    assert all(time.time() - folder.stat().st_mtime > 19 * DAY for folder in (good, bad, store / "fp"))

    status, out = run(capsys, "verify", "--store", str(store))
    assert status == 0 and ": 0 bad" in out and "stamped" not in out


def extract_stub() -> str:
    """Stands in for the extract stage: data/features whose files carry the fingerprint params.yaml names."""
    return (
        "import h5py, yaml\nfrom pathlib import Path\n"
        "fingerprint = yaml.safe_load(open('params.yaml'))['fingerprint']\n"
        "Path('data/features').mkdir(parents=True, exist_ok=True)\n"
        "for split in ('train', 'val', 'test'):\n"
        "    with h5py.File(f'data/features/{split}.h5', 'w') as handle:\n"
        "        handle.attrs['fingerprint'] = fingerprint\n"
    )


@pytest.fixture
def repo(tmp_path, monkeypatch) -> DvcRepo:
    """A git + DVC repo whose history refers to fingerprints in every way gc reads:
    fp-old (a commit past --commits 2), fp-a (a commit, via DVC's cache), fp-m (a commit whose cache is gone: via
    its metrics/extract.json), fp-b (an experiment only), fp-c (the workspace only, not committed)."""
    repo = DvcRepo(tmp_path / "repo")
    (repo.root / "extract_stub.py").write_text(extract_stub())
    (repo.root / "dvc.yaml").write_text(
        "stages:\n  extract:\n    cmd: python extract_stub.py\n    deps: [extract_stub.py]\n"
        "    params: [fingerprint]\n    outs: [data/features]\n")

    def run_with(fingerprint: str, how: str) -> None:
        (repo.root / "params.yaml").write_text(f"fingerprint: {fingerprint}\n")
        if how == "experiment":
            repo.dvc("exp", "run", "-n", "try-b")
            return
        repo.dvc("repro")
        if how == "commit":
            repo.run("git", "add", "-A")
            repo.run("git", "commit", "-qm", fingerprint)

    run_with("fp-old", "commit")
    run_with("fp-a", "commit")
    run_with("fp-m", "repro")
    (repo.root / "metrics").mkdir()
    (repo.root / "metrics" / "extract.json").write_text(json.dumps({"fingerprint": "fp-m"}))
    run_with("fp-m", "commit")
    listing = yaml.safe_load((repo.root / "dvc.lock").read_text())["stages"]["extract"]["outs"][0]["md5"]
    (repo.root / ".dvc" / "cache" / "files" / "md5" / listing[:2] / listing[2:]).unlink()
    (repo.root / "metrics" / "extract.json").unlink()  # from now on only that commit names fp-m
    run_with("fp-b", "experiment")
    run_with("fp-c", "repro")
    monkeypatch.chdir(repo.root)
    return repo


def test_gc_keeps_what_the_repo_refers_to_or_used_recently_and_deletes_the_rest(repo, capsys):
    store = repo.root / "data" / "feature-store"
    for fingerprint in ("fp-old", "fp-a", "fp-m", "fp-b", "fp-c", "fp-unused", "fp-locked"):
        fill(store, fingerprint, age_days=30)
    fill(store, "fp-recent", age_days=2)
    fresh, stale = store / "fp-a" / f"base-1.rejected-{time.time_ns()}", store / "fp-a" / "base-2.rejected-1000"
    fresh.write_bytes(b"x")
    stale.write_bytes(b"x")
    for name, days in (("run-old", 30), ("run-new", 1)):
        run_dir = store / "finetune" / name
        run_dir.mkdir(parents=True)
        (run_dir / "checkpoint.pt").write_bytes(b"x")
        age(run_dir / "checkpoint.pt", days)
        age(run_dir, days)
    everything = sorted(p.relative_to(store) for p in store.rglob("*"))

    status, out = run(capsys, "gc", "--store", str(store), "--dry-run", "--days", "7", "--commits", "2")
    assert status == 0 and "would free" in out
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == everything  # a dry run deletes nothing

    lock = FileLock(str(store / "fp-locked") + ".lock")
    with lock:
        status, out = run(capsys, "gc", "--store", str(store), "--days", "7", "--commits", "2")
    said = {line.split()[1].rstrip(":"): line for line in out.splitlines() if line.startswith(("keep", "delete"))}
    assert status == 0
    assert "commit" in said["fp-a"] and "commit" in said["fp-m"]
    assert "experiment try-b" in said["fp-b"] and "workspace" in said["fp-c"]
    assert "used 2.0 days ago" in said["fp-recent"] and "in use" in said["fp-locked"]
    remaining = {p.name for p in store.iterdir() if p.is_dir()}
    assert remaining == {"fp-a", "fp-m", "fp-b", "fp-c", "fp-recent", "fp-locked", "finetune"}
    assert fresh.exists() and not stale.exists()
    assert [p.name for p in (store / "finetune").iterdir()] == ["run-new"]
    with FeatureStore(store, "fp-a", DIM) as kept:  # what is kept still serves its rows
        assert len(kept) == 3


def test_gc_refuses_to_run_outside_a_project(tmp_path, monkeypatch):
    fill(tmp_path / "store", "fp")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="run gc from the project's root"):
        store_cli.main(["gc", "--store", "store"])
