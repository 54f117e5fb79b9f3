"""Writing a file so that a reader, or the next run after a crash, sees the old content or the new, never a cut-off
file: a temp file in the same folder, flushed and fsynced, then os.replace'd over the target."""
from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from transfer_learning.common.errors import UserError


@contextmanager
def atomic_write(path: Path | str, mode: str = "w", **open_options) -> Iterator[IO]:
    """`with atomic_write(path, newline="") as handle:` - the target changes only if the block completes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode, **open_options) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path, error) from None
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """`with atomic_path(path) as tmp: torch.save(state, tmp)` - for writers that take a file name. `tmp` has the
    target's own name, inside a private folder beside it: torch.save names the archive inside the file after the
    file, so the bytes are those a direct save gives. The target changes only if the block completes."""
    path = Path(path)
    folder = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp = folder / path.name
    try:
        shutil.rmtree(folder, ignore_errors=True)  # left by a killed run that had this pid
        folder.mkdir(parents=True)
        yield tmp
        descriptor = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(tmp, path)
    except BaseException as error:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path, error) from None
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    _fsync_dir(path.parent)


def disk_full(path: Path, error: OSError) -> UserError:
    """The error to show when `path` could not be written for lack of space (its old content is unchanged)."""
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return UserError(f"no space left to write {path} ({error.strerror}): its folder {path.parent.resolve()} has "
                     f"{free}; free some space there and run again (the previous {path.name}, if any, is unchanged)")


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def _fsync_dir(folder: Path) -> None:
    """Makes the rename itself durable (a power cut right after it could otherwise undo it)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
