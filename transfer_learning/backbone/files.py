"""models/backbone/: the downloaded backbone (weights.pt + meta.json), as every later stage loads it.

meta.json records the sha256 of weights.pt as written (`weights_pt_sha256`; its `sha256` is the verified source
file's); the weights are loaded only from bytes that match it.

torch and torchvision are imported only by `model` and `save`: extract and predict read meta.json alone, and
importing torchvision costs seconds of CPU (its ops import torch._dynamo).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transfer_learning.backbone.nodes import Anatomy
from transfer_learning.common.atomic import atomic_path, atomic_write_text
from transfer_learning.common.errors import UserError
from transfer_learning.common.hashing import read_verified, sha256_file
from transfer_learning.data.images import Preprocessing

BACKBONE_DIR = Path("models/backbone")
WEIGHTS = BACKBONE_DIR / "weights.pt"
META = BACKBONE_DIR / "meta.json"
ONNX = Path("models/backbone.onnx")
WEIGHTS_DIGEST = "weights_pt_sha256"

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Backbone:
    arch: str
    weights: str | None
    num_classes: int
    preprocessing: Preprocessing
    anatomy: Anatomy
    meta: dict

    @property
    def weights_sha256(self) -> str:
        """The sha256 of weights.pt recorded by download (what `model()` checks the file against)."""
        return self.meta[WEIGHTS_DIGEST]

    def model(self) -> nn.Module:
        import torch
        from torchvision.models import get_model

        model = get_model(self.arch, weights=None, num_classes=self.num_classes)
        state = torch.load(io.BytesIO(verified_weights(self.weights_sha256)), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        return model.eval()


def verified_weights(expected: str) -> bytes:
    """The bytes of weights.pt once their sha256 is the one in meta.json."""
    return read_verified(WEIGHTS, expected, META, f"restore it with `dvc checkout {BACKBONE_DIR}` or rebuild it "
                         "with `dvc repro download`")


def save(model: nn.Module, meta: dict) -> None:
    """weights.pt, then meta.json with its sha256. Saved to a file named weights.pt, not through a buffer: torch
    names the archive inside after the file, and the same bytes as before keep the fine-tune fingerprints (which
    hash weights.pt) and so their checkpoints valid."""
    import torch

    with atomic_path(WEIGHTS) as tmp:
        torch.save(model.state_dict(), tmp)
    atomic_write_text(META, json.dumps({**meta, WEIGHTS_DIGEST: sha256_file(WEIGHTS)}, indent=2) + "\n")


def load() -> Backbone:
    if not META.is_file() or not WEIGHTS.is_file():
        raise UserError(f"{BACKBONE_DIR} is incomplete: run `dvc repro download` first")
    try:
        meta = json.loads(META.read_text())
    except (UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{META} is not valid JSON ({error}): restore it with `dvc checkout {BACKBONE_DIR}` or "
                        "rebuild it with `dvc repro download`") from None
    if not isinstance(meta, dict) or WEIGHTS_DIGEST not in meta:
        raise UserError(f"{META} has no {WEIGHTS_DIGEST} (written by an older download, or damaged): run "
                        "`dvc repro download` (it reads the weights from the torch hub cache)")
    return Backbone(
        arch=meta["arch"],
        weights=meta["weights"],
        num_classes=meta["num_classes"],
        preprocessing=Preprocessing.from_json(meta["preprocessing"]),
        anatomy=Anatomy.from_json(meta),
        meta=meta,
    )
