"""atomic_write and atomic_path: the target holds the old content or the new, and a full disk is a clear error, not a traceback."""
from __future__ import annotations

import os

import pytest

from transfer_learning.common.atomic import atomic_path, atomic_write, atomic_write_text
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


def test_atomic_path_gives_torch_save_the_bytes_of_a_direct_save_and_keeps_the_old_file_on_failure(tmp_path):
    import torch

    state = {"weight": torch.arange(6.0).reshape(2, 3)}
    direct, target = tmp_path / "direct" / "weights.pt", tmp_path / "models" / "weights.pt"
    direct.parent.mkdir()
    torch.save(state, direct)  # the archive inside is named after the file: weights.pt -> "weights/..."
    with atomic_path(target) as tmp:
        torch.save(state, tmp)
    assert target.read_bytes() == direct.read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            torch.save({"weight": torch.zeros(1)}, tmp)
            raise RuntimeError("killed before the rename")
    assert target.read_bytes() == direct.read_bytes() and os.listdir(target.parent) == ["weights.pt"]


def test_atomic_path_on_a_full_disk_is_a_user_error_and_keeps_the_old_file(small_disk):
    target = small_disk / "model.onnx"
    atomic_write_text(target, "old model\n")
    with pytest.raises(UserError, match=f"no space left to write {target}"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"x" * 256 * 1024)
    assert target.read_text() == "old model\n" and os.listdir(small_disk) == ["model.onnx"]
