"""The evaluation preprocessing, the one every stage gets its model inputs from (extract and its Ray actors, predict,
the fine-tune's evaluation and frozen prefix, int8 calibration, the layer sweep, advise, the deploy check): an image
file's bytes decoded by the data's bit-depth rule (data/decode.py), resized and centre-cropped to uint8 pixels
(`PlainPixels`, `evaluation_pixels`), normalized to float32 (`NormalizeTable`). PIL and numpy only: a process that
should not import torch (a Ray actor pays ~4 s for torch + torchvision at start-up) runs the same code. torch
transforms are used only for training-time augmentation (features/views.py, finetune/data.py); `Preprocessing`'s
torch methods (data/images.py) are adapters over this module. What this code gives on the probe images
(data/probes.py) is hashed into every fingerprint that depends on pixels.

On a PIL image, torchvision's v2 Resize and CenterCrop are PIL's own `resize` and `crop`: the output size is
torchvision's rule (`_compute_resized_output_size`: the short side becomes `resize`, the long side
int(resize * long / short)), the crop's corner torchvision's rounding, and an image smaller than the crop is padded
with zeros, the larger half of an odd margin after the image. tests/test_pixels.py holds them equal on real images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from transfer_learning.data.decode import BitDepth, decode, read_checked

# torchvision's InterpolationMode values -> PIL's resampling filters (torchvision's pil_modes_mapping)
RESAMPLE = {"nearest": Image.Resampling.NEAREST, "nearest-exact": Image.Resampling.NEAREST,
            "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS}


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """(width, height) after torchvision's Resize(resize): the short side becomes `resize`."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop(samples: np.ndarray, crop: int) -> np.ndarray:
    """samples (H, W[, C]) -> (crop, crop[, C]): torchvision's CenterCrop, zeros padded around a smaller image."""
    height, width = samples.shape[:2]
    if crop > height or crop > width:
        top, left = max(crop - height, 0) // 2, max(crop - width, 0) // 2
        padded = np.zeros((max(crop, height), max(crop, width), *samples.shape[2:]), samples.dtype)
        padded[top:top + height, left:left + width] = samples
        samples, (height, width) = padded, padded.shape[:2]
    top, left = int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))
    return samples[top:top + crop, left:left + crop]


@dataclass(frozen=True)
class PlainPixels:
    """A decoded PIL image ('RGB' or grey 'L') -> resized, centre-cropped uint8 CHW array (1 channel for grey)."""

    resize: int
    crop: int
    interpolation: str

    @classmethod
    def of(cls, preprocessing) -> PlainPixels:
        """From a data.images.Preprocessing (or anything with its resize, crop and interpolation)."""
        return cls(preprocessing.resize, preprocessing.crop, preprocessing.interpolation)

    def __call__(self, image: Image.Image) -> np.ndarray:
        size = resized_size(image.width, image.height, self.resize)
        if size != image.size:
            image = image.resize(size, resample=RESAMPLE[self.interpolation])
        samples = center_crop(np.asarray(image), self.crop)
        # contiguous and writable (PIL's buffer is read-only): torch.from_numpy takes it as it is
        return np.require(samples[None] if samples.ndim == 2 else samples.transpose(2, 0, 1), requirements="CW")

    def read(self, path: str, sha256: str, bit_depth: BitDepth) -> tuple[np.ndarray | None, str | None]:
        """A prepared image's plain view, in both engines (views.ViewDataset, the Ray actors): (uint8 CHW, None) or
        (None, data.decode.read_checked's reason). A grey image stays one plane (a third of the resizing): the
        caller expands it to three channels or normalizes the three from it (NormalizeTable)."""
        image, error = read_checked(path, sha256, bit_depth, keep_grey=True)
        return (None, error) if image is None else (self(image), None)


class NormalizeTable:
    """The normalization (uint8 -> float32: x / 255, minus mean, over std, in float32) as one table of the
    256 values per channel; a batch is one lookup per image plane into a buffer the caller reuses."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        ramp = np.arange(256, dtype=np.float32) / np.float32(255.0)
        mean32, std32 = np.array(mean, np.float32)[:, None], np.array(std, np.float32)[:, None]
        self.table = (ramp[None, :] - mean32) / std32  # (channels, 256) float32

    @classmethod
    def of(cls, preprocessing) -> NormalizeTable:
        """From a data.images.Preprocessing (or anything with its mean and std)."""
        return cls(preprocessing.mean, preprocessing.std)

    def __call__(self, batch: np.ndarray, out: np.ndarray) -> np.ndarray:
        """uint8 NCHW -> float32 NCHW written into out[:N] (out: float32, at least N images of the same HW and as
        many channels as the table). A batch of grey planes (N1HW) gives each channel its table's values of the
        one plane: the same bits as the plane repeated."""
        out = out[:len(batch)]
        for image, normalized in zip(batch, out):
            for channel, table in enumerate(self.table):
                plane = image[channel if len(image) > 1 else 0]
                np.take(table, plane, out=normalized[channel], mode="clip")  # 'raise' buffers `out`: a copy
        return out

    def inputs(self, pixels: list[np.ndarray] | np.ndarray) -> np.ndarray:
        """uint8 CHW images (of one size; grey ones may be one plane) -> a new float32 NCHW batch."""
        batch = pixels if isinstance(pixels, np.ndarray) else np.stack(
            pixels if len({len(p) for p in pixels}) == 1 else [np.broadcast_to(p, (3, *p.shape[1:])) for p in pixels])
        out = np.empty((len(batch), len(self.table), *batch.shape[2:]), np.float32)
        return self(batch, out)


def evaluation_pixels(data: bytes, preprocessing) -> np.ndarray:
    """An image file's bytes -> uint8 CHW, one plane for a grey image (NormalizeTable gives it three channels):
    decoded by `preprocessing.bit_depth`'s rule, resized, centre-cropped. Raises data.decode.BadImage."""
    image = decode(data, preprocessing.bit_depth, keep_grey=True)
    return PlainPixels.of(preprocessing)(image)


def evaluation_inputs(images: list[bytes], preprocessing) -> np.ndarray:
    """Image files' bytes -> the float32 NCHW batch a model is evaluated on (see `evaluation_pixels`)."""
    return NormalizeTable.of(preprocessing).inputs([evaluation_pixels(data, preprocessing) for data in images])
