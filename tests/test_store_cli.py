"""python -m stages.store list | verify | gc on real stores, gc in a real git + DVC repository."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from filelock import FileLock

from stages import store as store_cli
from tests.dvc_repo import DvcRepo
from tests.test_feature_store import data_offset, flip, write_legacy
from transfer_learning.common.errors import UserError
from transfer_learning.data.images import Preprocessing
from transfer_learning.features.fingerprint import about, digest, fingerprint_spec
from transfer_learning.features.store import FeatureStore, store_key
from transfer_learning.layers.kept import kept_export

DIM = 8
DAY = 86400


def fp(name: str) -> str:
    """A fingerprint (64 hex digits, as every store folder is named) standing for `name` in these tests."""
    return hashlib.sha256(name.encode()).hexdigest()


def fill(root: Path, fingerprint: str, rows: int = 3, files: int = 1, age_days: float = 0) -> Path:
    """A fingerprint folder with `files` real store files, last used `age_days` ago (`fingerprint` is a name
    for fp() or already one)."""
    fingerprint = fingerprint if len(fingerprint) == 64 else fp(fingerprint)
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
    a = fill(store, "fp-a", rows=4, files=2)
    b = fill(store, "fp-b", rows=5, age_days=3)
    damaged = fill(store, "fp-damaged", rows=2, files=2)
    with h5py.File(sorted(damaged.glob("*.h5"))[0], "r+") as handle:
        handle.attrs["rows"] = "many"  # what used to stop `list` with a traceback
    run_dir = store / "finetune" / fp("run-1")
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(b"x" * 2_000_000)
    prefix_dir = store / "finetune" / fp("prefix recipe")  # where finetune/prefix.py keeps its export
    prefix_dir.mkdir()
    kept_export(prefix_dir / "prefix.onnx", {"what": "finetune frozen prefix"},
                lambda path: path.write_bytes(b"onnx" * 250_000))
    model = quantized_model(store / "quantized", "int8", age_days=1)
    model.with_name(f"{model.name}.rejected-{time.time_ns()}").write_bytes(b"x")
    status, out = run(capsys, "list", "--store", str(store))
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:-1]}
    assert status == 0
    assert lines[a.name][1:4] == ["8", megabytes(a), "2"]
    assert lines[b.name][1:4] == ["5", megabytes(b), "1"]
    assert lines[b.name][5] == time.strftime("%Y-%m-%d", time.localtime(time.time() - 3 * DAY))
    assert lines[damaged.name][1:4] == ["2", megabytes(damaged), "2"]  # the damaged file counts no rows
    assert lines[f"finetune/{run_dir.name}"][1:4] == ["-", "2.0", "1"]
    assert lines[f"finetune/{prefix_dir.name}"][1:4] == ["-", "1.0", "2"]  # prefix.onnx and its record
    under = dict(zip(out.splitlines(), out.splitlines()[1:]))
    described = {name: next(following for line, following in under.items() if line.startswith(name))
                 for name in (f"finetune/{run_dir.name}", f"finetune/{prefix_dir.name}")}
    assert described[f"finetune/{run_dir.name}"].startswith("  = fine-tune run: its checkpoints")
    assert described[f"finetune/{prefix_dir.name}"].startswith("  = fine-tune frozen-prefix export")
    assert lines[f"quantized/{model.name}"][1:5] == ["-", "0.0", "1", "1"]  # one copy moved aside
    assert "not a store folder" not in out


def test_list_names_what_each_fingerprint_stands_for_when_its_description_is_its_own(tmp_path, capsys):
    store = tmp_path / "store"
    preprocessing = Preprocessing(resize=256, crop=224, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear")
    spec = fingerprint_spec("ab" * 32, preprocessing, "float16", "int8")
    described = about(spec, "backbone features", arch="mobilenet_v2", weights="IMAGENET1K_V1", cut="penultimate",
                      cut_node="flatten", pool="avg", feature_dim=DIM)
    with FeatureStore(store, digest(spec), DIM, "float16", about=described) as written:
        written.add([store_key(f"{1:064x}", "0")], np.ones((1, DIM), np.float32))
    block_spec = fingerprint_spec("cd" * 32 + "/block_005", preprocessing, "float32")
    with FeatureStore(store, digest(block_spec), DIM, about=about(
            block_spec, "layer sweep block", arch="resnet18", weights=None, block=5, block_name="layer2",
            node="layer2", pool="max", feature_dim=DIM)):
        pass
    old = fill(store, "fp-old")  # written before folders were described
    forged = fill(store, "fp-forged")
    (forged / "about.json").write_text((store / digest(spec) / "about.json").read_text())  # another folder's

    status, out = run(capsys, "list", "--store", str(store))
    described_as = {line.split()[0]: following.removeprefix("  = ") for line, following in
                    zip(out.splitlines(), out.splitlines()[1:]) if following.startswith("  = ")}
    assert status == 0
    assert described_as[digest(spec)] == (
        "backbone features: mobilenet_v2 IMAGENET1K_V1, cut penultimate (node flatten), pool avg, features: 8, "
        "int8 float16, input 224 px of 256 (bilinear, bit depth auto)")
    assert described_as[digest(block_spec)].startswith(
        "layer sweep block: resnet18 random init, block 5 (layer2, node layer2), pool max, features: 8, fp32 float32")
    assert described_as[old.name].startswith("(no description")
    assert described_as[forged.name] == "(about.json does not describe this fingerprint: not shown)"
    assert len(described_as) == 4

    with pytest.raises(ValueError, match="another fingerprint's"):  # a run cannot file a description elsewhere
        FeatureStore(store, fp("elsewhere"), DIM, about=described)
    with FeatureStore(store, digest(spec), DIM, "float16"):  # a run that says nothing leaves the description
        pass
    assert json.loads((store / digest(spec) / "about.json").read_text())["arch"] == "mobilenet_v2"


def test_verify_names_and_moves_aside_bad_files_and_ones_without_digests_and_counts_as_no_use(tmp_path, capsys):
    store = tmp_path / "store"
    good = fill(store, "fp-good", files=2, age_days=20)
    bad = fill(store, "fp-bad", files=2, age_days=20)
    victim = sorted(bad.glob("*.h5"))[0]
    flip(victim, data_offset(victim, "features", 1, 3))
    keys = [store_key(f"{i:064x}", "0") for i in range(3)]
    legacy = store / fp("fp") / "base-1.h5"
    write_legacy(legacy, keys, np.ones((3, DIM), np.float32))
    with h5py.File(legacy, "r+") as handle:
        handle.attrs["fingerprint"] = fp("fp")
    Path(str(legacy.parent) + ".lock").touch()  # the lock file every store folder has beside it
    age(legacy.parent, 20)

    status, out = run(capsys, "verify", "--store", str(store))
    assert status == 1
    assert f"BAD      {victim}: fails its checksum" in out
    assert f"BAD      {legacy}: carries no sha256 digests" in out
    assert f"ok       {good.name}: 6 rows in 2 file(s)" in out and f"ok       {bad.name}: 3 rows in 1 file(s)" in out
    assert "verified 5 file(s)" in out and ": 2 bad" in out
    assert not victim.exists() and list(bad.glob(f"{victim.stem}.rejected-*"))
    assert all(time.time() - folder.stat().st_mtime > 19 * DAY for folder in (good, bad, legacy.parent))

    status, out = run(capsys, "verify", "--store", str(store))
    assert status == 0 and ": 0 bad" in out


def test_verify_moves_aside_a_file_whose_attrs_misstate_its_width_and_keeps_the_others(tmp_path, capsys):
    store = tmp_path / "store"
    folder = fill(store, "fp", files=2)  # no record of the width: each file is held to its own attrs
    victim = sorted(folder.glob("*.h5"))[0]
    with h5py.File(victim, "r+") as handle:  # file 1 of 2 says feature_dim 9, its data is 8 wide
        handle.attrs["feature_dim"] = 9
    status, out = run(capsys, "verify", "--store", str(store))
    assert status == 1
    assert f"BAD      {victim}: says 3 rows of 9 features but holds 3 keys and features of shape (3, 8)" in out
    assert out.count("BAD") == 1 and f"ok       {folder.name}: 3 rows in 1 file(s)" in out


def test_only_the_stores_own_folders_are_touched_anything_else_stays_byte_identical(tmp_path, monkeypatch, capsys):
    """extract.store pointed at a folder that holds other things (here the project's data/): verify and gc
    --days 0 handle the store's folders and leave every other file as it was."""
    project = tmp_path / "project"
    store = project / "data"
    foreign = [store / "features", store / "prepared", store / fp("not made by the store"),
               store / "finetune" / "notes", store / "README.md"]
    for folder in foreign[:3]:
        folder.mkdir(parents=True)
        with h5py.File(folder / "train.h5", "w") as handle:
            handle.create_dataset("features", data=np.ones((2, 3), np.float32))
            handle.attrs["fingerprint"] = "not a store file"
    keys = [store_key(f"{i:064x}", "0") for i in range(3)]
    write_legacy(foreign[2] / "base-1.h5", keys, np.ones((3, DIM), np.float32))  # a store file, but no lock beside
    foreign[3].mkdir(parents=True)
    (foreign[3] / "run.txt").write_text("kept by hand")
    foreign[4].write_text("not a folder of the store either")
    for path in store.rglob("*"):
        age(path, 30)
    ours = fill(store, "old", age_days=30)
    (project / "dvc.yaml").write_text("stages: {}\n")
    subprocess.run(["git", "init", "-q", str(project)], check=True)  # gc reads the history: none yet

    def snapshot() -> dict:
        return {p: (p.read_bytes() if p.is_file() else None, p.stat().st_mtime) for p in store.rglob("*")
                if not p.is_relative_to(ours)}

    before = snapshot()
    monkeypatch.chdir(project)
    status, verified = run(capsys, "verify", "--store", str(store))
    assert status == 0 and f"ok       {ours.name}: 3 rows in 1 file(s)" in verified and "verified 1 file(s)" in verified
    status, collected = run(capsys, "gc", "--store", str(store), "--days", "0")
    assert status == 0 and not ours.exists()
    assert snapshot() == before
    for out in (verified, collected):
        for entry in foreign:
            assert out.count(f"note: {entry}: not a store folder, left alone") == 1, out


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
    its metrics/extract.json), fp-b (an experiment only), fp-c (the workspace only, not committed); the fine-tune
    run and prefix fingerprints run-m and prefix-m (that commit's metrics/finetune.json) and run-w and prefix-w
    (the workspace's, not committed)."""
    repo = DvcRepo(tmp_path / "repo")
    (repo.root / "extract_stub.py").write_text(extract_stub())
    (repo.root / "dvc.yaml").write_text(
        "stages:\n  extract:\n    cmd: python extract_stub.py\n    deps: [extract_stub.py]\n"
        "    params: [fingerprint]\n    outs: [data/features]\n")

    def run_with(fingerprint: str, how: str) -> None:
        (repo.root / "params.yaml").write_text(f"fingerprint: '{fp(fingerprint)}'\n")
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
    (repo.root / "metrics" / "extract.json").write_text(json.dumps({"fingerprint": fp("fp-m"),
                                                                    "quantized_model": f"{fp('q-m')}.onnx"}))
    finetune_metrics = repo.root / "metrics" / "finetune.json"
    finetune_metrics.write_text(json.dumps({"run_fingerprint": fp("run-m"), "prefix_fingerprint": fp("prefix-m")}))
    repo.run("git", "add", "-A")  # fp-m's run above, committed with the metrics that name it
    repo.run("git", "commit", "-qm", "fp-m")
    listing = yaml.safe_load((repo.root / "dvc.lock").read_text())["stages"]["extract"]["outs"][0]["md5"]
    (repo.root / ".dvc" / "cache" / "files" / "md5" / listing[:2] / listing[2:]).unlink()
    (repo.root / "metrics" / "extract.json").unlink()  # from now on only that commit names fp-m
    finetune_metrics.unlink()
    run_with("fp-b", "experiment")
    run_with("fp-c", "repro")
    finetune_metrics.parent.mkdir(exist_ok=True)
    finetune_metrics.write_text(json.dumps({"run_fingerprint": fp("run-w"), "prefix_fingerprint": fp("prefix-w")}))
    monkeypatch.chdir(repo.root)
    return repo


def test_gc_keeps_what_the_repo_refers_to_or_used_recently_and_deletes_the_rest(repo, capsys):
    store = repo.root / "data" / "feature-store"
    for name in ("fp-old", "fp-a", "fp-m", "fp-b", "fp-c", "fp-unused", "fp-locked", "prefix-m", "prefix-w"):
        fill(store, name, age_days=30)
    fill(store, "fp-recent", age_days=2)
    fresh = store / fp("fp-a") / f"base-1.rejected-{time.time_ns()}"
    stale = store / fp("fp-a") / "base-2.rejected-1000"
    fresh.write_bytes(b"x")
    stale.write_bytes(b"x")
    for name, days in (("run-old", 30), ("run-new", 1), ("run-m", 30), ("run-w", 30)):
        run_dir = store / "finetune" / fp(name)
        run_dir.mkdir(parents=True)
        (run_dir / "checkpoint.pt").write_bytes(b"x")
        age(run_dir / "checkpoint.pt", days)
        age(run_dir, days)
    quantized = store / "quantized"
    models = {name: quantized_model(quantized, name, days) for name, days in
              (("q-m", 30), ("q-old", 30), ("q-recent", 2), ("q-locked", 30))}
    fresh_model = quantized / f"{fp('q-m')}.onnx.rejected-{time.time_ns()}"
    stale_model = quantized / f"{fp('q-gone')}.onnx.rejected-1000"
    fresh_model.write_bytes(b"x")
    stale_model.write_bytes(b"x")
    (quantized / "notes.txt").write_text("not the store's")
    everything = sorted(p.relative_to(store) for p in store.rglob("*"))

    status, out = run(capsys, "gc", "--store", str(store), "--dry-run", "--days", "7", "--commits", "2")
    assert status == 0 and "would free" in out
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == everything  # a dry run deletes nothing

    lock = FileLock(str(store / fp("fp-locked")) + ".lock")
    with lock, FileLock(str(models["q-locked"]) + ".lock"):
        status, out = run(capsys, "gc", "--store", str(store), "--days", "7", "--commits", "2")
    said = {line.split()[1].rstrip(":"): line for line in out.splitlines() if line.startswith(("keep", "delete"))}
    said = {name: said[key] for name in ("fp-a", "fp-m", "fp-b", "fp-c", "fp-recent", "fp-locked", "prefix-m",
                                         "prefix-w") for key in (fp(name),)} | {
        name: said[f"finetune/{fp(name)}"] for name in ("run-m", "run-w", "run-new")}
    assert status == 0
    assert "commit" in said["fp-a"] and "commit" in said["fp-m"]
    assert "experiment try-b" in said["fp-b"] and "workspace" in said["fp-c"]
    assert "used 2.0 days ago" in said["fp-recent"] and "in use" in said["fp-locked"]
    assert "commit" in said["prefix-m"] and "commit" in said["run-m"]  # read from metrics/finetune.json
    assert "workspace" in said["prefix-w"] and "workspace" in said["run-w"]
    assert "written 1.0 days ago" in said["run-new"]
    remaining = {p.name for p in store.iterdir() if p.is_dir()}
    assert remaining == {fp(name) for name in ("fp-a", "fp-m", "fp-b", "fp-c", "fp-recent", "fp-locked",
                                               "prefix-m", "prefix-w")} | {"finetune", "quantized"}
    assert fresh.exists() and not stale.exists()
    assert sorted(p.name for p in (store / "finetune").iterdir()) == sorted(fp(n) for n in ("run-new", "run-m",
                                                                                           "run-w"))
    with FeatureStore(store, fp("fp-a"), DIM) as kept:  # what is kept still serves its rows
        assert len(kept) == 3
    said = {line.split()[1].rstrip(":"): line for line in out.splitlines() if line.startswith(("keep", "delete"))}
    assert "commit" in said[f"quantized/{models['q-m'].name}"]  # metrics/extract.json's quantized_model
    assert "used 2.0 days ago" in said[f"quantized/{models['q-recent'].name}"]
    assert "in use" in said[f"quantized/{models['q-locked'].name}"]
    assert "not referenced, last used 30.0 days ago" in said[str(models["q-old"])]
    kept = {"q-m", "q-recent", "q-locked"}
    for name, model in models.items():
        record = model.with_name(model.name + ".sha256")
        assert model.exists() == record.exists() == (name in kept), name
    assert fresh_model.exists() and not stale_model.exists()
    assert (quantized / "notes.txt").read_text() == "not the store's"
    assert out.count(f"note: {quantized / 'notes.txt'}: not a store folder, left alone") == 1


def quantized_model(folder: Path, name: str, age_days: float) -> Path:
    """A model as features/quantize.py caches it (`<digest>.onnx`, its .sha256 and the .lock it was built under),
    last used `age_days` ago."""
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / f"{fp(name)}.onnx"
    model.with_name(model.name + ".lock").touch()
    model.write_bytes(name.encode())
    model.with_name(model.name + ".sha256").write_text(hashlib.sha256(name.encode()).hexdigest() + "\n")
    age(model, age_days)
    return model


def test_gc_refuses_to_run_outside_a_project(tmp_path, monkeypatch):
    fill(tmp_path / "store", "fp")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="run gc from the project's root"):
        store_cli.main(["gc", "--store", "store"])
