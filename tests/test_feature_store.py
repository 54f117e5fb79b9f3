"""The feature store on real HDF5 files: reuse, crash leftovers, corruption, fingerprints, locking."""
import multiprocessing
import time

import h5py
import numpy as np
import pytest

from stages.core.errors import UserError
from stages.core.feature_store import FeatureStore, store_key

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


def hold_lock(root, seconds, ready):
    with FeatureStore(root, "fp", DIM):
        ready.set()
        time.sleep(seconds)


def test_a_second_writer_waits_for_the_lock_or_fails_clearly(tmp_path):
    ready = multiprocessing.Event()
    holder = multiprocessing.Process(target=hold_lock, args=(tmp_path, 3, ready))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(UserError, match="stayed locked by another process"):
            with FeatureStore(tmp_path, "fp", DIM, lock_timeout=0.5):
                pass
        started = time.monotonic()
        with FeatureStore(tmp_path, "fp", DIM, lock_timeout=30):
            assert time.monotonic() - started > 0.5  # it waited for the holder instead of failing
    finally:
        holder.join()


def test_a_killed_holder_releases_the_lock(tmp_path):
    ready = multiprocessing.Event()
    holder = multiprocessing.Process(target=hold_lock, args=(tmp_path, 60, ready))
    holder.start()
    assert ready.wait(30)
    holder.kill()
    holder.join()
    with FeatureStore(tmp_path, "fp", DIM, lock_timeout=5):
        pass
