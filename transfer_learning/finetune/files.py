"""models/finetune/: the fine-tuned model as evaluate and predict use it.

model.onnx (normalized images in, class probabilities out), model.pt (the torch state dict, with meta.json
enough to rebuild it), test_scores.npz (the ONNX model's probabilities on the test split, keyed by image), and
meta.json, written last, with the sha256 of the other three: a file that does not match is never used. Only
skipped.json when finetune.enabled is false.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from transfer_learning.common.atomic import atomic_write, atomic_write_text
from transfer_learning.common.errors import UserError
from transfer_learning.common.hashing import read_verified, sha256_file
from transfer_learning.finetune.curves import write_curves

if TYPE_CHECKING:
    import numpy as np  # imported where used: a skipped stage needs none

FINETUNE_DIR = Path("models/finetune")
MODEL_NAME = "finetune"
PROBABILITIES, LOGITS = "probabilities", "logits"
ONNX, STATE_DICT, TEST_SCORES = "model.onnx", "model.pt", "test_scores.npz"
DIGESTED = (ONNX, STATE_DICT, TEST_SCORES)


def skip() -> dict:
    """What the stage writes when finetune.enabled is false (no torch imported); metrics/finetune.json's dict."""
    shutil.rmtree(FINETUNE_DIR, ignore_errors=True)
    FINETUNE_DIR.mkdir(parents=True)
    atomic_write_text(FINETUNE_DIR / "skipped.json", json.dumps({"enabled": False}) + "\n")
    write_curves([])  # no curve: the folder holds a note (common/curves.py)
    print("finetune.enabled is false: skipped")
    return {"skipped": True, "run_fingerprint": None, "prefix_fingerprint": None}


def onnx_path(directory: Path = FINETUNE_DIR) -> Path:
    return directory / ONNX


def trained(directory: Path = FINETUNE_DIR) -> bool:
    return (directory / "meta.json").is_file() and onnx_path(directory).is_file()


def read_meta(directory: Path = FINETUNE_DIR) -> dict:
    if not trained(directory):
        raise UserError(f"no fine-tuned model in {directory}: set finetune.enabled: true and run `dvc repro`")
    path = directory / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as error:
        meta = error
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a JSON object ({meta}): restore it with `dvc checkout {directory}` or "
                        "rebuild it with `dvc repro finetune`")
    return meta


def write_meta(meta: dict, directory: Path = FINETUNE_DIR) -> None:
    """meta.json with the digests of the files already written beside it."""
    digests = {name: sha256_file(directory / name) for name in DIGESTED}
    atomic_write_text(directory / "meta.json", json.dumps({**meta, "sha256": digests}, indent=2) + "\n")


def verified_bytes(name: str, directory: Path = FINETUNE_DIR) -> bytes:
    """The bytes of models/finetune/<name>, checked against the sha256 in meta.json."""
    digests = read_meta(directory).get("sha256")
    return read_verified(directory / name, digests.get(name) if isinstance(digests, dict) else None,
                         directory / "meta.json", f"run `dvc repro finetune` (or `dvc checkout {directory}` to "
                         "restore the committed files)")


def write_test_scores(keys: list[str], probabilities: np.ndarray, directory: Path = FINETUNE_DIR) -> None:
    import numpy as np

    with atomic_write(directory / TEST_SCORES, "wb") as handle:
        np.savez(handle, keys=np.array(keys), probabilities=probabilities.astype(np.float32))


def read_test_scores(keys: list[str], directory: Path = FINETUNE_DIR) -> np.ndarray:
    """The probabilities in the order of `keys` (the test split's rows), from the verified file."""
    import numpy as np

    with np.load(io.BytesIO(verified_bytes(TEST_SCORES, directory)), allow_pickle=False) as saved:
        row = {str(k): i for i, k in enumerate(saved["keys"])}
        missing = [k for k in keys if k not in row]
        if missing:
            raise UserError(f"{directory / TEST_SCORES} lacks {len(missing)} test image(s) of data/features/test.h5 "
                            "(the data changed since fine-tuning): run `dvc repro`")
        return saved["probabilities"][[row[k] for k in keys]].astype(np.float64)
