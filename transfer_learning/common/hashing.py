"""sha256 of files and bytes, streamed; reading a file back only if it still has the sha256 recorded for it."""
import hashlib
from pathlib import Path

from transfer_learning.common.errors import UserError


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_verified(path: Path, expected: str | None, record: Path, fix: str) -> bytes:
    """The bytes of `path` once they hash to `expected`, the sha256 that `record` holds for it. The file is read
    once, so what was checked is what the caller uses. Missing, unrecorded or changed: a UserError ending in `fix`."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {fix}") from None
    if expected is None:
        raise UserError(f"{path} has no sha256 in {record}: {fix}")
    if sha256_bytes(data) != expected:
        raise UserError(f"{path} does not match the sha256 in {record} (damaged or changed since it was written): "
                        f"{fix}")
    return data
