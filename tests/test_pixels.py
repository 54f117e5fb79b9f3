"""data/pixels.py: the plain view without torch equals torchvision's transform byte for byte, its normalization
equals `Preprocessing.normalize` bit for bit."""
from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from transfer_learning.data.images import Preprocessing
from transfer_learning.data.pixels import NormalizeTable, PlainPixels

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "nearest-exact", "box", "hamming", "lanczos")


def photo_like(height: int, width: int, channels: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise: edges and flat areas, so that every filter tap matters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 127 + 100 * np.sin(x / (3 + seed)) * np.cos(y / 5)
    samples = base[..., None] + rng.normal(0, 30, (height, width, channels))
    return np.clip(samples, 0, 255).astype(np.uint8).squeeze()


def file_bytes(samples: np.ndarray, format: str) -> bytes:
    buffer = io.BytesIO()
    if format == "TIFF16":  # high-bit: decode scales it to 8 bits by data.bit_depth
        tifffile.imwrite(buffer, samples.astype(np.uint16) * 16)  # 12-bit values
    else:
        Image.fromarray(samples).save(buffer, format=format)
    return buffer.getvalue()


IMAGES = {  # (height, width, channels, format): odd sizes, portrait and landscape, grey, smaller than the crop
    "grey png 28x28": (28, 28, 1, "PNG"), "rgb jpeg 37x251": (37, 251, 3, "JPEG"),
    "rgb png 300x199": (300, 199, 3, "PNG"), "thin grey 3x40": (3, 40, 1, "PNG"),
    "12-bit rgb tiff 45x30": (45, 30, 3, "TIFF16"), "12-bit grey tiff 30x17": (30, 17, 1, "TIFF16"),
}


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("resize, crop", [(256, 224), (21, 32), (32, 32)])  # 21 < 32: padded, odd margins
def test_plain_pixels_equal_torchvisions_transform_byte_for_byte(name, resize, crop):
    height, width, channels, format = IMAGES[name]
    data = file_bytes(photo_like(height, width, channels, seed=len(name)), format)
    for interpolation in INTERPOLATIONS if resize == 256 else ("bilinear",):
        preprocessing = Preprocessing(resize=resize, crop=crop, interpolation=interpolation, **IMAGENET)
        for keep_grey in (True, False):
            image = preprocessing.decode(data, keep_grey=keep_grey)
            expected = preprocessing.pixels()(image).numpy()
            got = PlainPixels.of(preprocessing)(image)
            assert got.dtype == np.uint8 and got.shape == expected.shape, (interpolation, got.shape)
            assert got.tobytes() == expected.tobytes(), (name, interpolation, resize, crop, keep_grey)


def test_the_normalization_table_is_preprocessings_normalize_bit_for_bit():
    preprocessing = Preprocessing(resize=256, crop=8, interpolation="bilinear", **IMAGENET)
    table = NormalizeTable(preprocessing.mean, preprocessing.std)
    ramp = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, 3, 1, 256).contiguous()
    assert table.table.tobytes() == preprocessing.normalize(ramp).numpy()[0, :, 0, :].tobytes()  # every value
    batch = np.random.default_rng(0).integers(0, 256, (3, 3, 8, 8), dtype=np.uint8)
    out = np.full((5, 3, 8, 8), np.nan, np.float32)  # a reused buffer, larger than the batch
    normalized = table(batch, out)
    assert normalized.shape == batch.shape and np.shares_memory(normalized, out)
    assert normalized.tobytes() == preprocessing.normalize(torch.from_numpy(batch)).numpy().tobytes()


def test_a_batch_of_grey_planes_normalizes_to_the_bits_of_the_plane_repeated():
    preprocessing = Preprocessing(resize=256, crop=8, interpolation="bilinear", **IMAGENET)
    table = NormalizeTable(preprocessing.mean, preprocessing.std)
    planes = np.random.default_rng(1).integers(0, 256, (4, 1, 8, 8), dtype=np.uint8)
    out = np.full((4, 3, 8, 8), np.nan, np.float32)
    got = table(planes, out)
    expected = preprocessing.normalize(torch.from_numpy(planes).expand(-1, 3, -1, -1).contiguous()).numpy()
    assert got.shape == (4, 3, 8, 8) and got.tobytes() == expected.tobytes()
    assert not np.array_equal(got[:, 0], got[:, 1])  # each channel through its own table, not one copied

