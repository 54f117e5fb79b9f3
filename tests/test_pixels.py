"""data/pixels.py, the evaluation preprocessing every stage uses: its plain view equals torchvision's Resize +
CenterCrop (what the weights were trained with, ImageClassification) byte for byte, its normalization equals x / 255,
minus the mean, over the std in float32 torch bit for bit; `Preprocessing`'s torch methods are this module's code."""
from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from torchvision.transforms import InterpolationMode, v2

from transfer_learning.data.images import Preprocessing
from transfer_learning.data.pixels import NormalizeTable, PlainPixels, evaluation_inputs, evaluation_pixels

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "nearest-exact", "box", "hamming", "lanczos")


def torchvision_pixels(preprocessing: Preprocessing) -> v2.Compose:
    """The reference: torchvision's ImageClassification up to its uint8 pixels."""
    return v2.Compose([v2.Resize(preprocessing.resize, interpolation=InterpolationMode(preprocessing.interpolation),
                                 antialias=True), v2.CenterCrop(preprocessing.crop), v2.PILToTensor()])


def torch_normalize(preprocessing: Preprocessing, batch: torch.Tensor) -> torch.Tensor:
    """The reference: x / 255, minus the mean, over the std, in float32 torch (ImageClassification's ToDtype +
    Normalize multiply by 1/255, which may differ in the last bit)."""
    mean, std = torch.tensor(preprocessing.mean).view(1, -1, 1, 1), torch.tensor(preprocessing.std).view(1, -1, 1, 1)
    return batch.to(torch.float32).div(255.0).sub(mean).div(std)


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
            expected = torchvision_pixels(preprocessing)(image).numpy()
            got = PlainPixels.of(preprocessing)(image)
            assert got.dtype == np.uint8 and got.shape == expected.shape, (interpolation, got.shape)
            assert got.tobytes() == expected.tobytes(), (name, interpolation, resize, crop, keep_grey)


def test_the_normalization_table_is_torchs_arithmetic_bit_for_bit():
    preprocessing = Preprocessing(resize=256, crop=8, interpolation="bilinear", **IMAGENET)
    table = NormalizeTable(preprocessing.mean, preprocessing.std)
    ramp = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, 3, 1, 256).contiguous()
    assert table.table.tobytes() == torch_normalize(preprocessing, ramp).numpy()[0, :, 0, :].tobytes()
    batch = np.random.default_rng(0).integers(0, 256, (3, 3, 8, 8), dtype=np.uint8)
    out = np.full((5, 3, 8, 8), np.nan, np.float32)  # a reused buffer, larger than the batch
    normalized = table(batch, out)
    assert normalized.shape == batch.shape and np.shares_memory(normalized, out)
    assert normalized.tobytes() == torch_normalize(preprocessing, torch.from_numpy(batch)).numpy().tobytes()


def test_a_batch_of_grey_planes_normalizes_to_the_bits_of_the_plane_repeated():
    preprocessing = Preprocessing(resize=256, crop=8, interpolation="bilinear", **IMAGENET)
    table = NormalizeTable(preprocessing.mean, preprocessing.std)
    planes = np.random.default_rng(1).integers(0, 256, (4, 1, 8, 8), dtype=np.uint8)
    out = np.full((4, 3, 8, 8), np.nan, np.float32)
    got = table(planes, out)
    expected = torch_normalize(preprocessing, torch.from_numpy(planes).expand(-1, 3, -1, -1).contiguous()).numpy()
    assert got.shape == (4, 3, 8, 8) and got.tobytes() == expected.tobytes()
    assert not np.array_equal(got[:, 0], got[:, 1])  # each channel through its own table, not one copied



def test_preprocessings_torch_methods_are_the_evaluation_preprocessing():
    """transform, pixels and normalize (what torch code calls) give the bits of data/pixels.py's functions."""
    preprocessing = Preprocessing(resize=36, crop=32, interpolation="bicubic", **IMAGENET)
    files = [file_bytes(photo_like(*IMAGES[name][:3], seed=i), IMAGES[name][3]) for i, name in enumerate(IMAGES)]
    inputs = evaluation_inputs(files, preprocessing)
    assert inputs.shape == (len(files), 3, 32, 32) and inputs.dtype == np.float32
    for data, expected in zip(files, inputs):
        image = preprocessing.decode(data)
        assert preprocessing.transform()(image).numpy().tobytes() == expected.tobytes()
        pixels = preprocessing.pixels()(image)
        assert pixels.shape == (3, 32, 32)
        assert np.array_equal(np.broadcast_to(evaluation_pixels(data, preprocessing), (3, 32, 32)), pixels.numpy())
        assert preprocessing.normalize(pixels[None]).numpy()[0].tobytes() == expected.tobytes()


AUGMENTING_MODULES = {"features/views.py", "finetune/data.py"}  # seeded training-time augmentation
EVALUATION_TRANSFORMS = {"Resize", "CenterCrop", "Normalize", "ToDtype", "ToImage", "ToTensor", "ConvertImageDtype"}


def test_torchvision_transforms_only_augment():
    """Every stage gets evaluation pixels from data/pixels.py: torchvision's transforms appear only in the modules
    that augment training images, and none of them resizes, crops centrally or normalizes."""
    import ast
    from pathlib import Path

    library = Path(__file__).resolve().parent.parent / "transfer_learning"
    offenders = []
    for path in sorted(library.rglob("*.py")):
        name = path.relative_to(library).as_posix()
        tree = ast.parse(path.read_text())
        imports_transforms = any(isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "torchvision.transforms") for node in ast.walk(tree))
        if imports_transforms and name not in AUGMENTING_MODULES:
            offenders.append(f"{name} imports torchvision.transforms")
        offenders += [f"{name}:{node.lineno} v2.{node.attr}" for node in ast.walk(tree)
                      if isinstance(node, ast.Attribute) and node.attr in EVALUATION_TRANSFORMS
                      and isinstance(node.value, ast.Name) and node.value.id in ("v2", "transforms")]
    assert not offenders, offenders
