"""models/finetune/: the fine-tuned model as evaluate and predict use it.

model.onnx (normalized images in, class probabilities out), model.pt (the torch state dict, with meta.json
enough to rebuild it), meta.json, test_scores.npz (the ONNX model's probabilities on the test split, keyed by
image), or only skipped.json when finetune.enabled is false.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stages.core.errors import UserError

FINETUNE_DIR = Path("models/finetune")
MODEL_NAME = "finetune"
PROBABILITIES, LOGITS = "probabilities", "logits"


def onnx_path(directory: Path = FINETUNE_DIR) -> Path:
    return directory / "model.onnx"


def trained(directory: Path = FINETUNE_DIR) -> bool:
    return (directory / "meta.json").is_file() and onnx_path(directory).is_file()


def read_meta(directory: Path = FINETUNE_DIR) -> dict:
    if not trained(directory):
        raise UserError(f"no fine-tuned model in {directory}: set finetune.enabled: true and run `dvc repro`")
    return json.loads((directory / "meta.json").read_text())


def write_test_scores(keys: list[str], probabilities: np.ndarray, directory: Path = FINETUNE_DIR) -> None:
    np.savez(directory / "test_scores.npz", keys=np.array(keys), probabilities=probabilities.astype(np.float32))


def read_test_scores(keys: list[str], directory: Path = FINETUNE_DIR) -> np.ndarray:
    """The probabilities in the order of `keys` (the test split's rows)."""
    with np.load(directory / "test_scores.npz", allow_pickle=False) as saved:
        row = {str(k): i for i, k in enumerate(saved["keys"])}
        missing = [k for k in keys if k not in row]
        if missing:
            raise UserError(f"{directory}/test_scores.npz lacks {len(missing)} test image(s) of data/features/test.h5 "
                            "(the data changed since fine-tuning): run `dvc repro`")
        return saved["probabilities"][[row[k] for k in keys]].astype(np.float64)
