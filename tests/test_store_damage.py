"""Whatever sits in a store folder, on real files: a file without digests, a directory, a looping symbolic link, a
FIFO, a file of another model; and a disk (a real tmpfs) that fills up during the end-of-run merge. Each is named
and moved aside, or left serving rows; none crashes a run or `python -m stages.store verify`, none costs a good row."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from stages import store as store_cli
from tests.conftest import merged
from transfer_learning.features.fingerprint import about, digest
from transfer_learning.features.split_files import SplitRows, read_split, write_split
from transfer_learning.features.store import FeatureStore, store_key

DIM = 8
OTHER_DIM = 96  # another model's width


def described(name: str, dim: int = DIM) -> dict:
    """The record a run leaves in its folder (ABOUT) for a fingerprint standing for `name`."""
    spec = {"onnx": digest({"model": name}), "preprocessing": {"resize": 8, "crop": 8}, "dtype": "float32"}
    return about(spec, "test rows", arch=name, feature_dim=dim)


FP = digest(described("good")["fingerprint_spec"])
OTHER_FP = digest(described("other", OTHER_DIM)["fingerprint_spec"])


def rows(n: int, start: int = 0, dim: int = DIM) -> tuple[list[str], np.ndarray]:
    keys = [store_key(f"{i:064x}", "0") for i in range(start, start + n)]
    return keys, np.arange(start * dim, (start + n) * dim, dtype=np.float32).reshape(n, dim) / 7


def good_folder(root: Path, n: int = 3, record: bool = True) -> Path:
    """A fingerprint folder as a run leaves it: one file of `n` rows, its record beside them, its lock beside it."""
    with FeatureStore(root, FP, DIM, about=described("good") if record else None) as store:
        store.add(*rows(n))
    return root / FP


def aside(folder: Path, name: str) -> list[Path]:
    """What a check moved `name` to (`<stem>.rejected-<ns>`), found without following links."""
    stem = name.rsplit(".", 1)[0]
    return [p for p in folder.iterdir() if p.name.startswith(f"{stem}.rejected-")]


def serves_the_good_rows(root: Path, n: int = 3) -> None:
    with FeatureStore(root, FP, DIM) as store:
        keys, features = rows(n)
        assert len(store) == n and not store.rejected_files
        np.testing.assert_array_equal(np.concatenate(list(store.gather(keys))), features)


def verify(capsys, root: Path) -> tuple[int, str]:
    status = store_cli.main(["verify", "--store", str(root)])
    return status, capsys.readouterr().out


# files without digests -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("missing", [("features_sha256", "keys_sha256"), ("keys_sha256",)])
def test_a_store_file_without_digests_is_moved_aside_and_its_rows_recomputed(tmp_path, caplog, missing):
    keys, features = rows(6)
    with FeatureStore(tmp_path, FP, DIM) as store:
        store.add(keys, features)
    old = next((tmp_path / FP).glob("*.h5"))
    with h5py.File(old, "r+") as handle:  # as the store wrote files before they carried digests
        for name in missing:
            del handle.attrs[name]
    with FeatureStore(tmp_path, FP, DIM) as store:
        assert store.rejected_files == [old.name] and len(store) == 0
        assert "carries no sha256 digests of its bytes" in store.rejected[old.name]
        store.add(keys, features + 1)  # recomputed (here by a model that gives other values)
    assert not old.exists() and aside(tmp_path / FP, old.name)
    with h5py.File(aside(tmp_path / FP, old.name)[0], "r") as handle:  # moved aside as it was, not stamped
        assert not any(name in handle.attrs for name in missing)
    with FeatureStore(tmp_path, FP, DIM) as store:
        assert len(store) == 6 and not store.rejected_files
        np.testing.assert_array_equal(np.concatenate(list(store.gather(keys))), features + 1)
    assert f"{old} carries no sha256 digests" in caplog.text


# what is not a store file --------------------------------------------------------------------------------------

def make_odd(folder: Path, kind: str, elsewhere: Path) -> str:
    """Puts something that is not a file the store wrote into `folder`; returns its name."""
    if kind == "directory":
        (folder / "base-0.h5").mkdir()
        (folder / "base-0.h5" / "inside").write_text("a directory named like a store file")
        return "base-0.h5"
    if kind == "looping link":
        os.symlink("segment-0.h5", folder / "segment-0.h5")
        return "segment-0.h5"
    if kind == "link to a good file":  # the store writes no links: one may point anywhere and change under it
        shutil.copy(next(folder.glob("*.h5")), elsewhere / "copy.h5")
        os.symlink(elsewhere / "copy.h5", folder / "base-0.h5")
        return "base-0.h5"
    if kind == "fifo":  # opening it for reading would wait for a writer forever
        os.mkfifo(folder / "base-0.h5")
        return "base-0.h5"
    if kind == "directory .part":
        (folder / "segment-0.part").mkdir()
        return "segment-0.part"
    raise ValueError(kind)


ODD = ["directory", "looping link", "link to a good file", "fifo", "directory .part"]
REASONS = {"directory": "is a directory", "looping link": "is a symbolic link (to 'segment-0.h5')",
           "link to a good file": "is a symbolic link", "fifo": "is a FIFO, socket or device",
           "directory .part": "is a directory named like an unfinished store file"}


@pytest.mark.parametrize("kind", ODD)
def test_a_run_moves_aside_what_is_not_a_store_file_and_serves_the_good_rows(tmp_path, caplog, kind):
    folder = good_folder(tmp_path / "store")
    name = make_odd(folder, kind, tmp_path)
    with FeatureStore(tmp_path / "store", FP, DIM, about=described("good")) as store:
        assert store.rejected_files == [name] and REASONS[kind] in store.rejected[name]
        assert len(store) == 3
    assert not os.path.lexists(folder / name) and len(aside(folder, name)) == 1
    assert f"{folder / name} {REASONS[kind]}" in caplog.text
    serves_the_good_rows(tmp_path / "store")


@pytest.mark.parametrize("kind", ODD)
def test_verify_names_and_moves_aside_what_is_not_a_store_file(tmp_path, capsys, kind):
    folder = good_folder(tmp_path / "store")
    name = make_odd(folder, kind, tmp_path)
    status, out = verify(capsys, tmp_path / "store")
    assert status == 1 and f"BAD      {folder / name}: {REASONS[kind]}" in out
    assert f"ok       {FP}: 3 rows in 1 file(s)" in out
    assert not os.path.lexists(folder / name) and len(aside(folder, name)) == 1
    status, out = verify(capsys, tmp_path / "store")
    assert status == 0 and ": 0 bad" in out


def test_list_counts_the_good_rows_beside_whatever_is_not_a_store_file(tmp_path, capsys):
    folder = good_folder(tmp_path / "store")
    (folder / "base-0.h5").mkdir()
    os.symlink("base-1.h5", folder / "base-1.h5")
    os.mkfifo(folder / "base-2.h5")  # opening it would wait for a writer forever
    assert store_cli.main(["list", "--store", str(tmp_path / "store")]) == 0  # lists, touches nothing
    listed = capsys.readouterr().out
    assert any(line.startswith(FP) and line.split()[1] == "3" for line in listed.splitlines()), listed


def test_a_record_that_is_a_directory_is_moved_aside_and_written_again(tmp_path, caplog):
    folder = good_folder(tmp_path / "store")
    (folder / "about.json").unlink()
    (folder / "about.json").mkdir()
    serves_the_good_rows(tmp_path / "store")  # a run without a description leaves it alone
    with FeatureStore(tmp_path / "store", FP, DIM, about=described("good")) as store:
        assert store.rejected_files == ["about.json"] and len(store) == 3
    assert json.loads((folder / "about.json").read_text())["feature_dim"] == DIM
    assert "about.json is a directory" in caplog.text


def test_a_fingerprint_folder_that_is_a_file_is_a_clear_error(tmp_path):
    from transfer_learning.common.errors import UserError

    (tmp_path / FP).write_text("not a folder")
    with pytest.raises(UserError, match=f"{tmp_path / FP} is a file, not a folder"):
        FeatureStore(tmp_path, FP, DIM).__enter__()


# the dimension a folder's files must have ---------------------------------------------------------------------

def foreign_file(tmp_path: Path, fingerprint_attr: str) -> Path:
    """A real store file of another model (OTHER_DIM features), its fingerprint attr set to `fingerprint_attr`."""
    root = tmp_path / f"other-{fingerprint_attr[:6]}"
    with FeatureStore(root, OTHER_FP, OTHER_DIM) as other:
        other.add(*rows(2, start=100, dim=OTHER_DIM))
    path = next((root / OTHER_FP).glob("*.h5"))
    with h5py.File(path, "r+") as handle:
        handle.attrs["fingerprint"] = fingerprint_attr
    return path


def test_verify_holds_files_to_the_dimension_the_folders_record_names_not_to_a_vote(tmp_path, capsys):
    """Two stray files of another model (96 features) sort before the one good file (8): a vote would keep them
    and move the good one aside."""
    folder = good_folder(tmp_path / "store")
    strays = {"base-0.h5": foreign_file(tmp_path, OTHER_FP), "base-1.h5": foreign_file(tmp_path, FP)}
    for name, path in strays.items():
        shutil.copy(path, folder / name)
    status, out = verify(capsys, tmp_path / "store")
    assert status == 1
    assert f"BAD      {folder / 'base-0.h5'}: was written for fingerprint '{OTHER_FP}'" in out
    assert f"BAD      {folder / 'base-1.h5'}: has feature_dim {OTHER_DIM} instead of {DIM}" in out
    assert out.count("BAD") == 2 and f"ok       {FP}: 3 rows in 1 file(s)" in out
    serves_the_good_rows(tmp_path / "store")


def test_without_a_record_files_that_disagree_are_named_not_judged_and_the_run_decides(tmp_path, capsys):
    folder = good_folder(tmp_path / "store", record=False)
    status, out = verify(capsys, tmp_path / "store")
    assert status == 0 and f"ok       {FP}: 3 rows in 1 file(s)" in out  # files that agree: checked in full
    good = next(folder.glob("*.h5"))
    shutil.copy(foreign_file(tmp_path, FP), folder / "base-0.h5")
    status, out = verify(capsys, tmp_path / "store")
    assert status == 1 and "BAD" not in out
    assert f"UNSURE   {folder / 'base-0.h5'}: holds {OTHER_DIM} x float32 features per row, other files here hold " \
        f"{DIM} x float32, and no about.json says which" in out
    assert f"UNSURE   {good}: holds {DIM} x float32 features per row, other files here hold {OTHER_DIM} x " in out
    assert sorted(p.name for p in folder.glob("*.h5")) == ["base-0.h5", good.name]  # nothing moved
    with FeatureStore(tmp_path / "store", FP, DIM) as store:  # a run knows its model's width
        assert store.rejected_files == ["base-0.h5"] and len(store) == 3


# a full disk during the end-of-run merge ----------------------------------------------------------------------

def segments(root: Path, keys: list[str], features: np.ndarray, per_file: int) -> FeatureStore:
    with FeatureStore(root, FP, features.shape[1]) as store:
        for start in range(0, len(keys), per_file):
            store.add(keys[start:start + per_file], features[start:start + per_file])
            store.commit()
    return store


def test_a_full_disk_at_the_merge_says_so_and_the_files_keep_serving_the_split_files(mount_small_disk, tmp_path,
                                                                                   caplog):
    disk = mount_small_disk("1M")
    keys, features = rows(72, dim=1280)
    segments(disk, keys, features, per_file=8)  # 9 files, 0.37 MB of rows
    filler = disk / "other-things"
    filler.write_bytes(b"x" * 400_000)  # so that the merged copy does not fit beside them
    with FeatureStore(disk, FP, 1280) as store:
        store.compact()  # raises nothing
        assert store.merge_skipped and len(store.files) == 9
        write_split(tmp_path / "train.h5", SplitRows(keys, ["x"] * 72, [0] * 72, [0] * 72), store.gather(keys),
                    fingerprint=FP, classes=["a"], feature_dim=1280, dtype="float32")
    assert (f"feature store {disk / FP}: no space left on its disk to merge its 9 files into one at the end of the "
            "run: the merged copy needs 0.4 MB (72 rows x 1280 x 4 bytes)") in store.merge_skipped
    assert "the 9 files serve all 72 rows as they are" in store.merge_skipped
    assert store.merge_skipped in caplog.text and "stages.store gc" not in store.merge_skipped
    assert not list(disk.rglob("*.part")) and len(list((disk / FP).glob("*.h5"))) == 9
    np.testing.assert_array_equal(read_split("train", tmp_path).features, features)
    filler.unlink()  # room again: the next run's merge goes through
    with FeatureStore(disk, FP, 1280) as store:
        assert len(store) == 72 and not store.rejected_files
        store.compact()
        assert store.merge_skipped is None and len(list((disk / FP).glob("*.h5"))) == 1
        np.testing.assert_array_equal(np.concatenate(list(store.gather(keys))), features)


def test_extract_moves_aside_non_files_and_past_a_full_disk_at_the_merge_writes_the_split_files(
        workdir, mount_small_disk, caplog):
    from stages import extract

    extract.main()
    first = json.loads(Path("metrics/extract.json").read_text())
    clean = {split: read_split(split).features for split in ("train", "val", "test")}
    with FeatureStore.existing(Path("store") / first["fingerprint"]) as written:
        keys = sorted(written.index)
        features = np.concatenate(list(written.gather(keys)))
    disk = mount_small_disk("512K")  # holds the rows in ten files, not a merged copy beside them
    with FeatureStore(disk, first["fingerprint"], features.shape[1]) as store:
        for start in range(0, len(keys), 6):
            store.add(keys[start:start + 6], features[start:start + 6])
            store.commit()
    (disk / first["fingerprint"] / "base-0.h5").mkdir()  # and what crashed extract before: a directory, a loop
    os.symlink("segment-0.h5", disk / first["fingerprint"] / "segment-0.h5")
    params = yaml.safe_load(Path("params.yaml").read_text())
    Path("params.yaml").write_text(yaml.safe_dump(merged(params, {"extract": {"store": str(disk)}}), sort_keys=False))
    with caplog.at_level(logging.WARNING):
        extract.main()
    metrics = json.loads(Path("metrics/extract.json").read_text())
    assert (metrics["computed"], metrics["store_files_rejected"]) == (0, ["base-0.h5", "segment-0.h5"])
    assert "no space left on its disk to merge its 10 files" in metrics["store_merge_skipped"]
    assert metrics["store_merge_skipped"] in caplog.text
    for split, values in clean.items():
        np.testing.assert_array_equal(read_split(split).features, values)
    assert len(list((disk / first["fingerprint"]).glob("*.h5"))) == 10 and not list(disk.rglob("*.part"))


# what is not a split file --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["directory", "looping link", "fifo"])
def test_a_split_file_that_is_not_a_file_is_refused_naming_what_it_is(tmp_path, kind):
    from transfer_learning.common.errors import UserError

    path = tmp_path / "train.h5"
    {"directory": path.mkdir, "looping link": lambda: os.symlink("train.h5", path),
     "fifo": lambda: os.mkfifo(path)}[kind]()
    what = {"directory": "a directory", "looping link": "a symbolic link (to 'train.h5')",
            "fifo": "a FIFO, socket or device"}[kind]
    with pytest.raises(UserError, match=rf"{path} is {re.escape(what)}, not a split file: restore it with `dvc "
                                        "checkout data/features`"):
        read_split("train", tmp_path)


def test_a_split_file_checked_out_as_a_link_is_read(tmp_path):
    keys, features = rows(4)
    write_split(tmp_path / "cache-copy.h5", SplitRows(keys, ["x"] * 4, [0] * 4, [0] * 4), iter([features]),
                fingerprint=FP, classes=["a"], feature_dim=DIM, dtype="float32")
    os.symlink(tmp_path / "cache-copy.h5", tmp_path / "train.h5")  # as DVC checks outputs out with cache.type symlink
    np.testing.assert_array_equal(read_split("train", tmp_path).features, features)


# gc and what was moved aside ----------------------------------------------------------------------------------

def test_gc_deletes_what_was_moved_aside_without_following_links(tmp_path, monkeypatch, capsys):
    """A looping link (dangling once renamed), a directory and a link to someone's directory, moved aside by a run
    and older than --days: gc deletes the three entries themselves and nothing a link points to."""
    project = tmp_path / "project"
    store = project / "store"
    folder = good_folder(store)
    theirs = tmp_path / "someone-elses"
    theirs.mkdir()
    (theirs / "precious.txt").write_text("not the store's")
    (folder / "base-0.h5").mkdir()
    (folder / "base-0.h5" / "inside").write_text("x")
    os.symlink("segment-0.h5", folder / "segment-0.h5")
    os.symlink(theirs, folder / "segment-1.h5")
    with FeatureStore(store, FP, DIM) as run:
        assert sorted(run.rejected_files) == ["base-0.h5", "segment-0.h5", "segment-1.h5"]
    for moved in [p for p in folder.iterdir() if ".rejected-" in p.name]:
        moved.rename(moved.with_suffix(".rejected-1000"))  # moved aside long ago (the suffix is when, in ns)
    (project / "dvc.yaml").write_text("stages: {}\n")
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    monkeypatch.chdir(project)
    status = store_cli.main(["gc", "--store", str(store), "--days", "1"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert sorted(p.name for p in folder.iterdir()) == ["about.json", next(folder.glob("*.h5")).name]
    assert out.count("rejected 20") == 3  # "rejected 20xxx.x days ago", one line each
    assert (theirs / "precious.txt").read_text() == "not the store's"
    serves_the_good_rows(store)
