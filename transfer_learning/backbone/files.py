"""models/backbone/: the downloaded backbone (weights.pt + meta.json), as every later stage loads it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import get_model

from transfer_learning.backbone.anatomy import Anatomy
from transfer_learning.common.errors import UserError
from transfer_learning.data.images import Preprocessing

BACKBONE_DIR = Path("models/backbone")
WEIGHTS = BACKBONE_DIR / "weights.pt"
META = BACKBONE_DIR / "meta.json"
ONNX = Path("models/backbone.onnx")


@dataclass(frozen=True)
class Backbone:
    arch: str
    weights: str | None
    num_classes: int
    preprocessing: Preprocessing
    anatomy: Anatomy
    meta: dict

    def model(self) -> nn.Module:
        model = get_model(self.arch, weights=None, num_classes=self.num_classes)
        model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
        return model.eval()


def save(model: nn.Module, meta: dict) -> None:
    BACKBONE_DIR.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), WEIGHTS)
    META.write_text(json.dumps(meta, indent=2) + "\n")


def load() -> Backbone:
    if not META.is_file() or not WEIGHTS.is_file():
        raise UserError(f"{BACKBONE_DIR} is incomplete: run `dvc repro download` first")
    meta = json.loads(META.read_text())
    return Backbone(
        arch=meta["arch"],
        weights=meta["weights"],
        num_classes=meta["num_classes"],
        preprocessing=Preprocessing.from_json(meta["preprocessing"]),
        anatomy=Anatomy.from_json(meta),
        meta=meta,
    )
