"""The feature store on real HDF5 files: reuse, crash leftovers, corruption (real flipped bytes), fingerprints,
locking, a full disk."""
import hashlib
import json
import logging
import multiprocessing
import re
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import REPO
from transfer_learning.common.errors import UserError
from transfer_learning.features.split_files import read_split
from transfer_learning.features.store import FeatureStore, store_key

DIM = 8


def rows(n, start=0):
    keys = [store_key(f"{i:064x}", "0") for i in range(start, start + n)]
    return keys, np.arange(start * DIM, (start + n) * DIM, dtype=np.float32).reshape(n, DIM)


def test_rows_survive_reopening_and_come_back_in_request_order(tmp_path):
    keys, features = rows(10)
    with FeatureStore(tmp_path, "fp", DIM, commit_rows=4) as store:
        store.add(keys[:6], features[:6])
        store.add(keys[6:], features[6:])
    with FeatureStore(tmp_path, "fp", DIM) as store:
        assert len(store) == 10 and all(k in store for k in keys)
        order = [9, 0, 5, 3]
        got = np.concatenate(list(store.gather([keys[i] for i in order], chunk=3)))
        np.testing.assert_array_equal(got, features[order])


def test_compaction_leaves_one_file_with_every_row(tmp_path):
    keys, features = rows(50)
    with FeatureStore(tmp_path, "fp", DIM, commit_rows=5) as store:
        for start in range(0, 40, 5):
            store.add(keys[start:start + 5], features[start:start + 5])
        store.compact()
        assert len(list(store.dir.glob("*.h5"))) == 8  # a few files: not worth rewriting the store
        store.add(keys[40:], features[40:])
        store.compact()
        assert len(list(store.dir.glob("*.h5"))) == 1
        np.testing.assert_array_equal(np.concatenate(list(store.gather(keys))), features)


def test_compaction_also_removes_files_whose_rows_all_live_elsewhere(tmp_path):
    keys, features = rows(5)
    with FeatureStore(tmp_path, "fp", DIM) as store:
        store.add(keys, features)
    first = next((tmp_path / "fp").glob("*.h5"))
    (tmp_path / "fp" / "segment-0.h5").write_bytes(first.read_bytes())  # a kill between rename and unlink
    with FeatureStore(tmp_path, "fp", DIM) as store:
        store.compact(above_files=1)
        assert len(list(store.dir.glob("*.h5"))) == 1
        np.testing.assert_array_equal(np.concatenate(list(store.gather(keys))), features)


def test_keys_too_long_for_the_file_are_refused_not_truncated():
    with pytest.raises(ValueError, match="longer than"):
        store_key("f" * 64, "aug-12345678-" + "9" * 40)


def test_uncommitted_part_files_are_dropped_and_committed_rows_kept(tmp_path):
    keys, features = rows(6)
    with FeatureStore(tmp_path, "fp", DIM) as store:
        store.add(keys, features)
    (tmp_path / "fp" / "segment-999.part").write_bytes(b"half a file")  # what a kill mid-write leaves
    with FeatureStore(tmp_path, "fp", DIM) as store:
        assert len(store) == 6 and not list(store.dir.glob("*.part"))


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "unreadable"),
    ("fingerprint", "was written for fingerprint"),
    ("rows", "says 99 rows"),
])
def test_untrustworthy_files_are_reported_moved_aside_and_not_served(tmp_path, caplog, damage, reason):
    good_keys, good = rows(3)
    bad_keys, bad = rows(4, start=3)
    with FeatureStore(tmp_path, "fp", DIM) as store:
        store.add(good_keys, good)
        store.commit()
        store.add(bad_keys, bad)
    victim = max((tmp_path / "fp").glob("*.h5"))
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:1000])
    else:
        with h5py.File(victim, "r+") as handle:
            handle.attrs.update({"fingerprint": "other"} if damage == "fingerprint" else {"rows": 99})
    with FeatureStore(tmp_path, "fp", DIM) as store:
        assert all(k in store for k in good_keys)
        assert not any(k in store for k in bad_keys)
        assert store.rejected_files == [victim.name]
    assert reason in caplog.text
    assert not victim.exists() and list((tmp_path / "fp").glob(f"{victim.stem}.rejected-*"))


def hold_lock(root, ready, release, released):
    with FeatureStore(root, "fp", DIM):
        ready.set()
        release.wait(60)
        released.set()  # still holding the lock: set before the lock is given up


class Seen(logging.Handler):
    """Sets `event` when a log record holds `text`."""

    def __init__(self, text: str, event: threading.Event):
        super().__init__()
        self.text, self.event = text, event

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def test_a_second_writer_waits_for_the_lock_or_fails_clearly(tmp_path, caplog):
    ready, release, released = (multiprocessing.Event() for _ in range(3))
    holder = multiprocessing.Process(target=hold_lock, args=(tmp_path, ready, release, released))
    holder.start()
    store_log = logging.getLogger(FeatureStore.__module__)
    waiting = threading.Event()
    seen = Seen("is in use by another process; waiting", waiting)
    store_log.addHandler(seen)
    try:
        assert ready.wait(30)
        with pytest.raises(UserError, match="stayed locked by another process"):
            with FeatureStore(tmp_path, "fp", DIM, lock_timeout=0.5):
                pass
        waiting.clear()
        got_lock = []

        def second_writer():
            with FeatureStore(tmp_path, "fp", DIM, lock_timeout=60):
                got_lock.append(released.is_set())

        with caplog.at_level(logging.INFO, logger=FeatureStore.__module__):
            writer = threading.Thread(target=second_writer)
            writer.start()
            assert waiting.wait(30)  # it found the lock held and waits for it...
            assert not got_lock  # ...and has not got it while the holder holds it
            release.set()
            writer.join(60)
        assert got_lock == [True]  # it got the lock once the holder had let it go, not before, and did not fail
    finally:
        store_log.removeHandler(seen)
        release.set()
        holder.join()


def test_a_killed_holder_releases_the_lock(tmp_path):
    ready, release, released = (multiprocessing.Event() for _ in range(3))
    holder = multiprocessing.Process(target=hold_lock, args=(tmp_path, ready, release, released))
    holder.start()
    assert ready.wait(30)
    holder.kill()
    holder.join()
    with FeatureStore(tmp_path, "fp", DIM, lock_timeout=5):
        pass


# integrity: real bytes flipped in real files ---------------------------------------------------------------

def feature_of(key: str) -> np.ndarray:
    """What "the model" computes for a key: recomputing gives the same row, as extract does."""
    return np.random.default_rng(int(key[:64], 16)).normal(size=DIM).astype(np.float32)


def computed(keys):
    return np.stack([feature_of(k) for k in keys])


def data_offset(path, dataset: str, row: int, byte: int) -> int:
    """Where byte `byte` of row `row` of a contiguous dataset lies in the file."""
    with h5py.File(path, "r") as handle:
        ds = handle[dataset]
        return ds.id.get_offset() + row * ds.dtype.itemsize * int(np.prod(ds.shape[1:])) + byte


def flip(path, offset: int, mask: int = 0x40) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        value = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([value ^ mask]))


def write_legacy(path, keys, features) -> None:
    """A store file as the store wrote it before files carried digests."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("keys", data=np.array(keys, dtype="S96"))
        handle.create_dataset("features", data=features)
        handle.attrs.update(fingerprint="fp", rows=len(keys), feature_dim=DIM)


def recompute_missing(store, keys) -> list[str]:
    todo = [k for k in keys if k not in store]
    if todo:
        store.add(todo, computed(todo))
    store.commit()
    return todo


@pytest.mark.parametrize("dataset, byte, mask", [
    ("features", 3, 0x40),  # the exponent byte of a float32: 0.70 -> 2.4e38, still finite
    ("keys", 5, 0x01),      # one hex digit of a key becomes another: still a well-formed key
    ("keys", 0, 0x80),      # not ASCII any more
])
def test_a_flipped_byte_is_caught_and_its_rows_recomputed_as_in_a_clean_run(tmp_path, caplog, dataset, byte, mask):
    keys = rows(10)[0]
    with FeatureStore(tmp_path / "clean", "fp", DIM) as store:
        recompute_missing(store, keys)
        clean = np.concatenate(list(store.gather(keys)))
    with FeatureStore(tmp_path, "fp", DIM) as store:
        recompute_missing(store, keys[:5])
        recompute_missing(store, keys)  # two files of five rows
    victim = sorted((tmp_path / "fp").glob("*.h5"))[1]
    flip(victim, data_offset(victim, dataset, 2, byte), mask)

    with FeatureStore(tmp_path, "fp", DIM) as store:
        assert store.rejected_files == [victim.name]
        assert recompute_missing(store, keys) == keys[5:]
        np.testing.assert_array_equal(np.concatenate(list(store.gather(keys))), clean)
    assert f"its {dataset} bytes differ from the sha256 recorded" in caplog.text
    assert list((tmp_path / "fp").glob(f"{victim.stem}.rejected-*"))
    with FeatureStore(tmp_path, "fp", DIM) as store:  # the recomputed rows are trusted from now on
        assert len(store) == 10 and not store.rejected_files


@pytest.mark.parametrize("damage, reason", [
    ("key not text", "holds a key that is not text at row 2"),
    ("key malformed", "holds a malformed key at row 2"),
    ("inf", "holds non-finite features"),
])
def test_files_whose_digests_match_what_the_store_never_writes_are_rejected(tmp_path, caplog, damage, reason):
    keys = rows(6)[0]
    legacy = tmp_path / "fp" / "base-1.h5"
    write_legacy(legacy, keys, computed(keys))
    if damage == "inf":
        with open(legacy, "r+b") as handle:
            handle.seek(data_offset(legacy, "features", 2, 0))
            handle.write(np.float32(np.inf).tobytes())
    else:
        flip(legacy, data_offset(legacy, "keys", 2, 0), 0x80 if damage == "key not text" else 0x10)
    with h5py.File(legacy, "r+") as handle:  # digests of the damaged bytes: only the content checks can tell
        handle.attrs.update(features_sha256=hashlib.sha256(handle["features"][:]).hexdigest(),
                            keys_sha256=hashlib.sha256(handle["keys"][:]).hexdigest())
    with FeatureStore(tmp_path, "fp", DIM) as store:
        assert store.rejected_files == ["base-1.h5"] and len(store) == 0
        recompute_missing(store, keys)
        np.testing.assert_array_equal(np.concatenate(list(store.gather(keys))), computed(keys))
    assert reason in caplog.text


def test_rows_damaged_on_disk_after_the_store_was_opened_are_not_served(tmp_path):
    keys = rows(6)[0]
    with FeatureStore(tmp_path, "fp", DIM) as store:
        recompute_missing(store, keys)
    victim = next((tmp_path / "fp").glob("*.h5"))
    with FeatureStore(tmp_path, "fp", DIM) as store:
        with open(victim, "r+b") as handle:  # after the check on open, before the read
            handle.seek(data_offset(victim, "features", 1, 0))
            handle.write(np.float32(np.nan).tobytes())
        with pytest.raises(UserError, match="damaged during this run and is moved aside"):
            list(store.gather(keys))
        assert store.rejected_files == [victim.name] and len(store) == 0
    with FeatureStore(tmp_path, "fp", DIM) as store:
        assert recompute_missing(store, keys) == keys


def test_every_single_flipped_byte_of_a_store_file_is_caught_or_harmless_never_a_crash(tmp_path):
    """Each byte of a real 2 x 8 segment flipped in turn (in its long runs of reserved zero bytes, one in 64): the
    store opens without raising every time, and either moves the file aside and serves none of its rows, or serves
    exactly the rows written; `list` reads it too. Two rows: what more rows add is data bytes, read and digested
    alike; every structure a segment has (superblock, object headers, attributes) is in it whatever its rows."""
    from transfer_learning.features.upkeep import rows_in

    keys, features = rows(2)
    with FeatureStore(tmp_path / "clean", "fp", DIM) as store:
        store.add(keys, features)
    original = next((tmp_path / "clean" / "fp").glob("*.h5")).read_bytes()
    folder = tmp_path / "fp"
    folder.mkdir()
    unused = [range(m.start() + 1, m.end()) for m in re.finditer(rb"\x00{1024,}", original)]  # reserved space
    verdicts = {"rejected": 0, "trusted": 0}
    for offset in range(len(original)):
        if any(offset in zeros and offset % 64 for zeros in unused):  # one flip in 64 stands for the rest
            continue
        damaged = bytearray(original)
        damaged[offset] ^= 0x40
        (folder / "segment-1.h5").write_bytes(bytes(damaged))
        rows_in(folder)
        with FeatureStore(tmp_path, "fp", DIM) as store:
            if store.rejected_files or len(store) == 0:
                assert (store.rejected_files, len(store)) == (["segment-1.h5"], 0), offset
                verdicts["rejected"] += 1
            else:
                np.testing.assert_array_equal(np.concatenate(list(store.gather(keys))), features, err_msg=offset)
                verdicts["trusted"] += 1
        for aside in folder.glob("segment-1.rejected-*"):
            aside.unlink()
    assert verdicts["rejected"] > 1000 and verdicts["trusted"] > 1000  # both outcomes were really exercised


@pytest.mark.parametrize("dataset, byte", [("features", 3), ("keys", 5)])
def test_compaction_does_not_give_a_file_changed_after_opening_a_fresh_digest(tmp_path, dataset, byte):
    keys, features = rows(9)
    with FeatureStore(tmp_path, "fp", DIM) as store:
        for start in range(0, 9, 3):
            store.add(keys[start:start + 3], features[start:start + 3])
            store.commit()
    files = sorted((tmp_path / "fp").glob("*.h5"))
    with FeatureStore(tmp_path, "fp", DIM) as store:
        flip(files[1], data_offset(files[1], dataset, 1, byte), 0x01)  # after the check on open; still finite
        with pytest.raises(UserError, match="damaged during this run and is moved aside"):
            store.compact(above_files=1)
        assert store.rejected_files == [files[1].name]
    assert sorted((tmp_path / "fp").glob("*.h5")) == [files[0], files[2]]  # no merged file, nothing laundered
    assert not list((tmp_path / "fp").glob("*.part"))
    with FeatureStore(tmp_path, "fp", DIM) as store:
        assert not store.rejected_files and sorted(store.index) == keys[:3] + keys[6:]
        np.testing.assert_array_equal(np.concatenate(list(store.gather(keys[:3] + keys[6:]))),
                                      np.concatenate([features[:3], features[6:]]))


def test_non_finite_rows_are_refused_not_stored(tmp_path):
    keys, features = rows(4)
    features[2, 1] = np.nan
    with FeatureStore(tmp_path, "fp", DIM) as store:
        store.add(keys[:1], features[:1])
        with pytest.raises(UserError, match="non-finite features .* for 1 of 3 rows"):
            store.add(keys[1:], features[1:])
    with FeatureStore(tmp_path, "fp", DIM) as store:
        assert len(store) == 1  # the rows added before are kept
    with FeatureStore(tmp_path, "fp16", DIM, dtype="float16") as store:
        with pytest.raises(UserError, match="try extract.dtype: float32"):
            store.add(keys[:1], np.full((1, DIM), 1e6, np.float32))  # overflows float16


# a full disk -------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(mount_small_disk):
    return mount_small_disk("1M")


FILL_THE_DISK = """
import numpy as np
from tests.conftest import REPO
from transfer_learning.common.errors import run_main
from transfer_learning.features.store import FeatureStore, store_key

def main():
    keys = [store_key(f"{i:064x}", "0") for i in range(400)]
    with FeatureStore(ROOT, "fp", 1280) as store:
        store.add(keys[:20], np.ones((20, 1280), np.float32))
        store.commit()
        store.add(keys[20:], np.ones((380, 1280), np.float32))  # 1.9 MB on a 1 MB disk
        store.commit()

run_main(main)
"""


def test_a_full_disk_stops_with_one_clear_error_and_keeps_the_committed_rows(small_disk):
    result = subprocess.run([sys.executable, "-c", FILL_THE_DISK.replace("ROOT", repr(str(small_disk)))], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, result.stderr
    assert f"no space left on the disk of the feature store {small_disk / 'fp'}" in error[0]
    assert "writing 380 rows needs 1.9 MB (380 rows x 1280 x 4 bytes)" in error[0]
    assert "The 20 rows committed before are kept" in error[0]
    assert not list(small_disk.rglob("*.part"))
    keys = [store_key(f"{i:064x}", "0") for i in range(400)]
    with FeatureStore(small_disk, "fp", 1280) as store:
        assert len(store) == 20 and not store.rejected_files
        store.add(keys[20:], np.ones((380, 1280), np.float32))
        with pytest.raises(UserError, match="no space left"):
            store.commit()
        assert not store.pending_keys  # nothing left for __exit__ to write again: leaving the block raises nothing
    assert not list(small_disk.rglob("*.part"))


# through the extract stage -----------------------------------------------------------------------------

def test_extract_recomputes_the_rows_of_a_store_file_with_a_flipped_byte(workdir, caplog):
    from stages import extract

    extract.main()
    clean = {split: read_split(split, Path("data/features")) for split in ("train", "val", "test")}
    victim = next(Path("store").glob("*/*.h5"))
    # the store commits every few seconds as well as every commit_rows: a slow machine leaves several files, and
    # only the damaged one's rows are recomputed
    with h5py.File(victim, "r") as handle:
        victim_rows = len(handle["keys"])
    flip(victim, data_offset(victim, "features", 7, 3))
    extract.main()
    metrics = json.loads(Path("metrics/extract.json").read_text())
    assert (metrics["computed"], metrics["reused"], metrics["store_files_rejected"]) == \
        (victim_rows, 60 - victim_rows, [victim.name])
    assert "features bytes differ from the sha256 recorded" in caplog.text
    for split, before in clean.items():
        after = read_split(split, Path("data/features"))
        assert after.paths == before.paths
        np.testing.assert_allclose(after.features, before.features, atol=1e-5)
