"""Decoding any image file a user may have into RGB, and the backbone's preprocessing as a v2 transform."""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode, v2

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class BadImage(Exception):
    """The bytes are not a decodable image; the message says why."""


def decode(data: bytes) -> Image.Image:
    """A fully decoded RGB image, or BadImage (empty, truncated, not an image, decompression bomb)."""
    if not data:
        raise BadImage("empty file")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only; PIL raises above 2x MAX_IMAGE_PIXELS
        if Image.MAX_IMAGE_PIXELS and image.width * image.height > Image.MAX_IMAGE_PIXELS:
            # PIL only warns between 1x and 2x; a warnings filter would not be thread-safe, so check here
            raise BadImage(f"decompression bomb: {image.width}x{image.height} pixels exceeds the limit of "
                           f"{Image.MAX_IMAGE_PIXELS} (PIL.Image.MAX_IMAGE_PIXELS)")
        image.load()
    except BadImage:
        raise
    except Image.DecompressionBombError as error:
        raise BadImage(f"decompression bomb: {error}") from None
    except UnidentifiedImageError:
        raise BadImage("not a decodable image: not a format PIL can identify") from None
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise BadImage(f"not a decodable image: {type(error).__name__}: {error}") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any PIL mode; 16-bit and float images are scaled to 8 bits instead of clipped."""
    if image.mode in HIGH_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(pixels.max()), 1.0)
        image = Image.fromarray(np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass(frozen=True)
class Preprocessing:
    """What the backbone's weights expect, read from `weights.transforms()` (torchvision's ImageClassification)."""

    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    antialias: bool = True

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
        return cls(**{**data, "mean": tuple(data["mean"]), "std": tuple(data["std"])})

    def transform(self) -> v2.Compose:
        """PIL RGB image -> normalized float tensor, in the same order as ImageClassification."""
        return v2.Compose([self.pixels(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)])

    def pixels(self) -> v2.Compose:
        """PIL RGB image -> resized, cropped uint8 CHW tensor: the part worth doing in worker processes
        (4x less to send than floats); `normalize` finishes a whole batch at once."""
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
