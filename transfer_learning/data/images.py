"""The backbone's preprocessing as a v2 transform, and the decoding of data/decode.py behind `Preprocessing.decode`."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from transfer_learning.data.decode import BIT_DEPTHS, BadImage, BitDepth, decode, is_bit_depth  # noqa: F401

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

    def transform(self) -> v2.Compose:
        """PIL RGB image -> normalized float tensor, in the same order as ImageClassification."""
        return v2.Compose([self.pixels(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)])

    def pixels(self) -> v2.Compose:
        """PIL RGB (or grey: one channel) image -> resized, cropped uint8 CHW tensor: the part worth doing in worker
        processes (4x less to send than floats); `normalize` finishes a whole batch at once."""
        return v2.Compose([
            v2.Resize(self.resize, interpolation=InterpolationMode(self.interpolation), antialias=self.antialias),
            v2.CenterCrop(self.crop),
            v2.PILToTensor(),
        ])

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW -> float32 NCHW, the same arithmetic as ToDtype(scale=True) + Normalize."""
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return batch.to(torch.float32).div_(255.0).sub_(mean).div_(std)
