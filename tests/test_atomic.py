"""atomic_write: the target holds the old content or the new, and a full disk is a clear error, not a traceback."""
from __future__ import annotations

import os

import pytest

from transfer_learning.common.atomic import atomic_write, atomic_write_text
from transfer_learning.common.errors import UserError


@pytest.fixture
def small_disk(mount_small_disk):
    return mount_small_disk("64k")


def test_the_target_changes_only_when_the_block_completes(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as handle:
            handle.write("new, cut off")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and os.listdir(target.parent) == ["file.txt"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


@pytest.mark.parametrize("mode", ["w", "wb"])
def test_a_full_disk_is_a_user_error_and_keeps_the_old_file(small_disk, mode):
    target = small_disk / "labels.csv"
    atomic_write_text(target, "old content\n")
    big = "x" * (256 * 1024)
    with pytest.raises(UserError) as caught:
        with atomic_write(target, mode) as handle:
            handle.write(big if mode == "w" else big.encode())
    message = str(caught.value)
    assert f"no space left to write {target}" in message
    assert f"its folder {small_disk} has " in message and " MiB free" in message
    assert "previous labels.csv, if any, is unchanged" in message
    assert target.read_text() == "old content\n"
    assert os.listdir(small_disk) == ["labels.csv"]  # the temp file is gone: its space is free again
    atomic_write_text(target, "fits\n")  # and the next small write succeeds
    assert target.read_text() == "fits\n"
