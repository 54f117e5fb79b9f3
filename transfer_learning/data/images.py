"""What the backbone's weights expect of an image (`Preprocessing`), and torch adapters over the evaluation
preprocessing of data/pixels.py: `transform`, `pixels` and `normalize` run that module's code and hand back tensors,
so a stage that works in torch gets the very pixels extract computes features from. torchvision transforms are
used only for training-time augmentation (features/views.py, finetune/data.py)."""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from transfer_learning.data.decode import BIT_DEPTHS, BadImage, BitDepth, decode, is_bit_depth  # noqa: F401
from transfer_learning.data.pixels import NormalizeTable, PlainPixels
from transfer_learning.data.probes import probe_digest

if TYPE_CHECKING:  # torch is imported by the adapters below only: reading or hashing a Preprocessing needs none
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocessing:
    """What the backbone's weights expect, read from `weights.transforms()` (torchvision's ImageClassification)."""

    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    antialias: bool = True
    # the data's rule for high-bit images (data.bit_depth, recorded by prepare in data/prepared/decoding.json):
    # part of to_json, hence of every feature fingerprint. A backbone's meta.json holds the default; each stage
    # sets the data's rule with `with_bit_depth(manifest.read_bit_depth())`.
    bit_depth: BitDepth = "auto"

    def __post_init__(self):
        if not is_bit_depth(self.bit_depth):
            raise ValueError(f"bit_depth {self.bit_depth!r}; valid: auto, {', '.join(map(str, BIT_DEPTHS))}")

    @classmethod
    def from_weights_transforms(cls, transforms) -> Preprocessing:
        return cls(
            resize=int(transforms.resize_size[0]),
            crop=int(transforms.crop_size[0]),
            mean=tuple(float(m) for m in transforms.mean),
            std=tuple(float(s) for s in transforms.std),
            interpolation=transforms.interpolation.value,
            antialias=bool(transforms.antialias),
        )

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Preprocessing:
        """Also reads a meta.json written before bit_depth existed (it then holds the default)."""
        return cls(**{**data, "mean": tuple(data["mean"]), "std": tuple(data["std"])})

    def with_bit_depth(self, bit_depth: BitDepth) -> Preprocessing:
        return replace(self, bit_depth=bit_depth)

    def decode(self, data: bytes, keep_grey: bool = False) -> Image.Image:
        """The image file's bytes as RGB, high-bit samples scaled by this preprocessing's bit_depth rule.
        `keep_grey`: a grey image stays 'L'. PIL resamples each band alike, so `pixels` of it, repeated to three
        channels, are the very bytes of `pixels` of its RGB copy, for a third of the resizing work."""
        return decode(data, self.bit_depth, keep_grey)

    def probe_digest(self) -> str:
        """What this preprocessing makes of the probe images with the code and libraries running now
        (data/probes.py): every fingerprint that depends on pixels holds it."""
        return probe_digest(self)

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> normalized float CHW tensor (3 channels): data/pixels.py's plain pixels, then its
        normalization."""
        import torch

        pixels, table = PlainPixels.of(self), _table(self.mean, self.std)
        return lambda image: torch.from_numpy(table.inputs([pixels(image)])[0])

    def pixels(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> resized, cropped uint8 CHW tensor (3 channels, a grey image's plane repeated):
        data/pixels.py's PlainPixels."""
        import torch

        pixels = PlainPixels.of(self)

        def to_tensor(image: Image.Image) -> torch.Tensor:
            plane_or_rgb = torch.from_numpy(pixels(image))
            return plane_or_rgb.expand(3, -1, -1).contiguous() if len(plane_or_rgb) == 1 else plane_or_rgb

        return to_tensor

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW (grey images may be one plane) -> float32 NCHW: data/pixels.py's NormalizeTable."""
        import torch

        return torch.from_numpy(_table(self.mean, self.std).inputs(np.ascontiguousarray(batch.numpy())))


@functools.lru_cache(maxsize=16)
def _table(mean: tuple[float, ...], std: tuple[float, ...]) -> NormalizeTable:
    return NormalizeTable(mean, std)
