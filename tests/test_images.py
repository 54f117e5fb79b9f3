"""Decoding high-bit images by data.bit_depth: real 16-bit PNG/TIFF, 32-bit integer and float TIFF files."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from transfer_learning.common.hashing import sha256_bytes
from transfer_learning.data import decode as decoding
from transfer_learning.data.images import Preprocessing
from transfer_learning.data.pixels import PlainPixels
from transfer_learning.features.views import ViewDataset, ViewRequest, collate, read_image

ORIGINAL = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
ORIGINAL[0, 0], ORIGINAL[0, 1] = 0, 255  # the full 8-bit range, as in a real photo


def encoded(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def file_of(samples: np.ndarray, format: str, mode: str) -> bytes:
    """Real file bytes; asserts PIL reads them back in the mode under test."""
    if mode == "I;16B":
        image = Image.frombytes(mode, samples.shape[::-1], samples.astype(">u2").tobytes())
    else:
        image = Image.fromarray(samples)
    data = encoded(image, format)
    assert Image.open(io.BytesIO(data)).mode == mode
    return data


def twelve_bit(pixels: np.ndarray) -> np.ndarray:
    return np.round(pixels.astype(np.float64) * 4095 / 255).astype(np.uint16)


def gray(data: bytes, bit_depth) -> np.ndarray:
    out = np.asarray(decoding.decode(data, bit_depth))
    assert out.shape[2] == 3 and (out[..., 0] == out[..., 2]).all()
    return out[..., 0].astype(int)


def original() -> np.ndarray:
    return gray(encoded(Image.fromarray(ORIGINAL), "PNG"), "auto")


# (format, PIL mode, samples holding the 8-bit original at some depth)
SIXTEEN_BIT_FILES = {
    "png 8-bit values": ("PNG", "I;16", ORIGINAL.astype(np.uint16)),
    "png 12-bit values": ("PNG", "I;16", twelve_bit(ORIGINAL)),
    "tiff 8-bit values": ("TIFF", "I;16", ORIGINAL.astype(np.uint16)),
    "tiff 12-bit values": ("TIFF", "I;16", twelve_bit(ORIGINAL)),
    "tiff big-endian 12-bit values": ("TIFF", "I;16B", twelve_bit(ORIGINAL)),
    "tiff 12-bit values shifted to the top": ("TIFF", "I;16", twelve_bit(ORIGINAL) << 4),
    "tiff full 16-bit range": ("TIFF", "I;16", ORIGINAL.astype(np.uint16) * 257),
    "tiff 32-bit integer, 12-bit values": ("TIFF", "I", twelve_bit(ORIGINAL).astype(np.int32)),
}


@pytest.mark.parametrize("case", SIXTEEN_BIT_FILES)
def test_high_bit_files_decode_like_the_8_bit_original(case):
    format, mode, samples = SIXTEEN_BIT_FILES[case]
    decoded = gray(file_of(samples, format, mode), "auto")
    assert np.abs(decoded - original()).max() <= 1


def test_the_old_16_bit_rule_would_have_made_a_12_bit_file_nearly_black():
    """What auto fixes, and what forcing data.bit_depth: 16 still gives."""
    data = file_of(twelve_bit(ORIGINAL), "TIFF", "I;16")
    assert gray(data, 16).max() <= 16 and original().max() == 255


def test_forced_bit_depth_is_obeyed_even_where_auto_would_choose_otherwise():
    eight = file_of(ORIGINAL.astype(np.uint16), "PNG", "I;16")
    twelve = file_of(twelve_bit(ORIGINAL), "PNG", "I;16")
    assert np.abs(gray(twelve, 12) - original()).max() <= 1
    # 8-bit values read as 12-bit: 255 of 4095 is 16 of 255
    assert np.abs(gray(eight, 12) - np.round(ORIGINAL.astype(float) * 255 / 4095)).max() <= 1
    # 12-bit values read as 8-bit: what exceeds 255 clips to white
    assert np.array_equal(gray(twelve, 8), np.minimum(twelve_bit(ORIGINAL), 255))


@pytest.mark.parametrize("maximum, bits", [(0, 8), (255, 8), (256, 10), (1023, 10), (1024, 12), (4095, 12),
                                           (4096, 14), (16384, 16), (65535, 16)])
def test_auto_picks_the_smallest_depth_holding_the_maximum(maximum, bits):
    samples = np.zeros((2, 2), np.uint16)
    samples[1, 1] = maximum
    decoded = gray(file_of(samples, "PNG", "I;16"), "auto")
    assert decoded[1, 1] == round(maximum / (2 ** bits - 1) * 255)


def test_32_bit_values_beyond_16_bits_are_scaled_by_their_maximum():
    samples = ORIGINAL.astype(np.int32) * 4096 - 5000  # up to about 2**20, and some negative
    decoded = gray(file_of(samples, "TIFF", "I"), "auto")
    expected = np.round(np.maximum(samples, 0) / samples.max() * 255)
    assert np.abs(decoded - expected).max() <= 1 and decoded.max() == 255


def test_float_images_in_0_1_are_fractions_otherwise_values_by_the_bit_depth_rule():
    fractions = (ORIGINAL / 255).astype(np.float32)
    assert np.abs(gray(file_of(fractions, "TIFF", "F"), "auto") - original()).max() <= 1
    assert np.abs(gray(file_of(fractions, "TIFF", "F"), 16) - original()).max() <= 1  # the float convention wins
    counts = twelve_bit(ORIGINAL).astype(np.float32)
    assert np.abs(gray(file_of(counts, "TIFF", "F"), "auto") - original()).max() <= 1
    broken = fractions.copy()
    broken[0, :3] = [np.nan, np.inf, -0.5]
    assert list(gray(file_of(broken, "TIFF", "F"), "auto")[0, :3]) == [0, 0, 0]


def test_8_bit_images_ignore_the_rule():
    data = encoded(Image.fromarray(ORIGINAL), "PNG")
    assert all(np.array_equal(gray(data, rule), ORIGINAL) for rule in ("auto", 8, 12, 16))


# ---------------------------------------------------------------- 16-bit colour files (pypng, tifffile)

COLOUR = np.stack([ORIGINAL, ORIGINAL[::-1], ORIGINAL.T], axis=-1)  # three different channels, 0..255 each


def png_of(samples: np.ndarray, alpha: bool = False, greyscale: bool = False) -> bytes:
    """A real 16-bit PNG written by pypng (RGB: 48-bit, RGBA: 64-bit, grey+alpha); checks PIL's header read."""
    import png

    height, width, planes = samples.shape
    buffer = io.BytesIO()
    png.Writer(width, height, bitdepth=16, alpha=alpha, greyscale=greyscale).write(
        buffer, samples.reshape(height, width * planes).tolist())
    data = buffer.getvalue()
    assert data[24] == 16 and Image.open(io.BytesIO(data)).mode in ("RGB", "RGBA", "LA")
    return data


def tiff_of(samples: np.ndarray, **options) -> bytes:
    """A real 16-bit RGB(A) TIFF written by tifffile."""
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, samples, photometric="rgb", **options)
    return buffer.getvalue()


def rgb(data: bytes, bit_depth) -> np.ndarray:
    out = decoding.decode(data, bit_depth)
    assert out.mode == "RGB"
    return np.asarray(out).astype(int)


def with_alpha(samples: np.ndarray) -> np.ndarray:
    return np.concatenate([samples, np.full(samples.shape[:2] + (1,), 65535, np.uint16)], axis=-1)


SIXTEEN_BIT_COLOUR_FILES = {
    "48-bit png, 12-bit values": lambda: png_of(twelve_bit(COLOUR)),
    "48-bit png, 8-bit values": lambda: png_of(COLOUR.astype(np.uint16)),
    "48-bit png, full 16-bit range": lambda: png_of(COLOUR.astype(np.uint16) * 257),
    "64-bit png (alpha), 12-bit values": lambda: png_of(with_alpha(twelve_bit(COLOUR)), alpha=True),
    "tiff 16-bit rgb, 12-bit values": lambda: tiff_of(twelve_bit(COLOUR)),
    "tiff 16-bit rgb deflate, 12-bit values": lambda: tiff_of(twelve_bit(COLOUR), compression="zlib"),
    "tiff 16-bit rgb big-endian, 12-bit values": lambda: tiff_of(twelve_bit(COLOUR), byteorder=">"),
    "tiff 16-bit rgb planar, 12-bit values": lambda: tiff_of(np.moveaxis(twelve_bit(COLOUR), -1, 0),
                                                             planarconfig="separate"),
    "tiff 16-bit rgba, 12-bit values": lambda: tiff_of(with_alpha(twelve_bit(COLOUR)), extrasamples=["unassalpha"]),
}


@pytest.mark.parametrize("case", SIXTEEN_BIT_COLOUR_FILES)
def test_16_bit_colour_files_decode_like_the_8_bit_original(case):
    decoded = rgb(SIXTEEN_BIT_COLOUR_FILES[case](), "auto")
    assert np.abs(decoded - COLOUR).max() <= 1


def test_pil_alone_would_have_made_a_12_bit_colour_file_nearly_black():
    for data in (png_of(twelve_bit(COLOUR)), tiff_of(twelve_bit(COLOUR))):
        assert np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).max() <= 16  # the top 8 of 16 bits
        assert np.abs(rgb(data, 12) - COLOUR).max() <= 1
        assert rgb(data, 16).max() <= 16  # forcing 16 bits is obeyed, as for grey files
        assert np.abs(rgb(data, 8) - np.minimum(twelve_bit(COLOUR), 255)).max() <= 1  # beyond 8 bits clips


def test_16_bit_grey_with_alpha_png_decodes_by_the_rule():
    samples = with_alpha(twelve_bit(ORIGINAL)[..., None])
    assert np.abs(gray(png_of(samples, alpha=True, greyscale=True), "auto") - original()).max() <= 1


def lzw_tiff_of(samples: np.ndarray) -> bytes:
    """A real LZW-compressed 16-bit RGB TIFF (tifffile writes LZW only with imagecodecs: tests/probe_images.py)."""
    from tests.probe_images import lzw_tiff

    return lzw_tiff(samples)


def test_an_lzw_decoder_given_to_tifffile_reads_the_16_bit_colour_tiff_in_full():
    """What installing imagecodecs does, with the LZW decoder the probe images' script has (a real one)."""
    import tifffile

    from tests.probe_images import tiff_lzw_decode

    data = lzw_tiff_of(twelve_bit(COLOUR))
    tifffile.TIFF.DECOMPRESSORS._codecs[5] = tiff_lzw_decode
    try:
        assert np.abs(rgb(data, "auto") - COLOUR).max() <= 1
    finally:
        del tifffile.TIFF.DECOMPRESSORS._codecs[5]


def test_a_tiff_compression_tifffile_cannot_read_falls_back_to_pil_with_a_warning(caplog):
    try:
        import imagecodecs  # noqa: F401
    except ImportError:
        pass
    else:
        assert np.abs(rgb(lzw_tiff_of(twelve_bit(COLOUR)), "auto") - COLOUR).max() <= 1
        pytest.skip("imagecodecs is installed: tifffile reads LZW itself, there is no fallback to test")
    samples = twelve_bit(COLOUR)
    data = lzw_tiff_of(samples)
    pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert np.array_equal(pil, samples >> 8)  # a real LZW file: PIL reads it, to the top 8 bits
    decoding._WARNED.clear()
    with caplog.at_level("WARNING", logger=decoding.__name__):
        assert np.array_equal(rgb(data, "auto"), pil)
        rgb(data, "auto")
    warnings = [r.getMessage() for r in caplog.records if "16-bit colour TIFF" in r.getMessage()]
    assert len(warnings) == 1 and "LZW" in warnings[0] and "pip install imagecodecs" in warnings[0]


def test_a_broken_16_bit_colour_file_is_a_bad_image():
    for data in (png_of(twelve_bit(COLOUR)), tiff_of(twelve_bit(COLOUR), compression="zlib")):
        with pytest.raises(decoding.BadImage, match="not a decodable image"):
            decoding.decode(data[:-40], "auto")


# ---------------------------------------------------------------- the rule travels in Preprocessing


def preprocessing(bit_depth="auto") -> Preprocessing:
    return Preprocessing(resize=16, crop=16, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear",
                         bit_depth=bit_depth)


def test_old_preprocessing_json_without_bit_depth_loads_with_auto():
    old = {k: v for k, v in preprocessing().to_json().items() if k != "bit_depth"}
    assert Preprocessing.from_json(old).bit_depth == "auto"
    twelve = preprocessing().with_bit_depth(12)
    assert Preprocessing.from_json(twelve.to_json()) == twelve and twelve.to_json()["bit_depth"] == 12
    with pytest.raises(ValueError, match="bit_depth"):
        preprocessing().with_bit_depth(9)


def test_features_of_another_rule_are_never_served_again():
    """The rule is in the preprocessing, hence in extract's fingerprint: rows computed under another data.bit_depth
    get another store key (rows of other decoding code: tests/test_probe_fingerprint.py)."""
    from transfer_learning.features.fingerprint import fingerprint

    prints = {fingerprint("onnx", spec, "float32") for spec in (preprocessing(), preprocessing(12), preprocessing(16))}
    assert len(prints) == 3


def test_extract_and_finetune_read_high_bit_files_by_the_preprocessing_rule(tmp_path):
    reference = tmp_path / "original.png"
    reference.write_bytes(encoded(Image.fromarray(ORIGINAL), "PNG"))
    deep = tmp_path / "twelve.tif"
    deep.write_bytes(file_of(twelve_bit(ORIGINAL), "TIFF", "I;16"))
    requests = [ViewRequest(str(p), sha256_bytes(p.read_bytes()), 0) for p in (reference, deep)]

    auto = ViewDataset(requests, preprocessing())
    (plain, error), (scaled, deep_error) = auto[0], auto[1]
    assert error is None and deep_error is None
    assert (plain.to(torch.int16) - scaled.to(torch.int16)).abs().max() <= 1

    image, error = read_image(requests[1], preprocessing(16))
    assert error is None and np.asarray(image).max() <= 16


# ---------------------------------------------------------------- the same rule in extract, on real files


def features_by_path() -> tuple[dict[str, np.ndarray], str]:
    """data/features/*.h5 as the contract describes them: features, paths, and the fingerprint in attrs."""
    out, fingerprints = {}, set()
    for split in ("train", "val", "test"):
        with h5py.File(f"data/features/{split}.h5", "r") as handle:
            paths = [p.decode() if isinstance(p, bytes) else p for p in handle["paths"][:]]
            out.update(zip(paths, handle["features"][:]))
            fingerprints.add(str(handle.attrs["fingerprint"]))
    assert len(fingerprints) == 1
    return out, fingerprints.pop()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_extract_gives_a_12_bit_tiff_copy_the_features_of_its_original(workdir):
    """A folder where some images are 16-bit TIFFs holding 12-bit values, next to 8-bit PNGs: under auto, their
    features are those of the 8-bit originals; forcing data.bit_depth: 16 (the old rule) makes them differ, under
    another fingerprint."""
    from stages import extract, prepare

    for other in (workdir / "images").glob("[2-9]"):  # two classes: how many does not change what is proven
        shutil.rmtree(other)
    originals = sorted((workdir / "images").glob("[01]/*.png"))[:4]
    for path in originals:
        pixels = np.asarray(Image.open(path))
        path.with_name(f"{path.stem}-12bit.tif").write_bytes(file_of(twelve_bit(pixels), "TIFF", "I;16"))

    def run(bit_depth) -> tuple[dict[str, np.ndarray], str]:
        params = yaml.safe_load(Path("params.yaml").read_text())
        params["data"]["bit_depth"] = bit_depth
        Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        prepare.main()
        extract.main()
        return features_by_path()

    auto, auto_fingerprint = run("auto")
    forced, forced_fingerprint = run(16)

    assert auto_fingerprint != forced_fingerprint
    for path in originals:
        original, copy = f"images/{path.parent.name}/{path.name}", f"images/{path.parent.name}/{path.stem}-12bit.tif"
        assert cosine(auto[original], auto[copy]) > 0.999, path
        assert cosine(forced[original], forced[copy]) < 0.9, path
        np.testing.assert_array_equal(forced[original], auto[original])  # 8-bit files: the rule changes nothing


# ---------------------------------------------------------------- extract's fast path: the same bytes, less work

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


@pytest.mark.parametrize("size", [(28, 28), (40, 17), (300, 200), (10, 50)])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_grey_images_resized_as_one_plane_give_the_bytes_of_their_rgb_copy(size, interpolation):
    """Up- and downscaling, odd and portrait sizes, a crop larger than one side (padding): bit for bit."""
    grey = np.random.default_rng(sum(size)).integers(0, 256, size[::-1], dtype=np.uint8)
    data = encoded(Image.fromarray(grey), "PNG")
    ours = Preprocessing(resize=36, crop=32, interpolation=interpolation, **IMAGENET)
    kept = ours.decode(data, keep_grey=True)
    assert kept.mode == "L"
    plain = PlainPixels.of(ours)
    one_plane = plain(kept)
    assert one_plane.shape[0] == 1
    assert np.array_equal(np.broadcast_to(one_plane, (3, 32, 32)), plain(ours.decode(data)))


def test_the_plain_view_of_a_grey_file_is_its_rgb_copys_view(tmp_path):
    rng = np.random.default_rng(1)
    grey, rgb = tmp_path / "grey.png", tmp_path / "rgb.png"
    grey.write_bytes(encoded(Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8)), "PNG"))
    rgb.write_bytes(encoded(Image.open(grey).convert("RGB"), "PNG"))
    ours = Preprocessing(resize=36, crop=32, interpolation="bilinear", **IMAGENET)
    dataset = ViewDataset([ViewRequest(str(p), sha256_bytes(p.read_bytes()), 0) for p in (grey, rgb)], ours)
    (from_grey, _), (from_rgb, _) = dataset[0], dataset[1]
    assert from_grey.shape == from_rgb.shape == (3, 32, 32)
    assert torch.equal(from_grey, from_rgb)


def test_grey_planes_beside_colour_images_are_stacked_as_three_channels(tmp_path):
    """extract's ViewDataset keeps a grey image as one plane; a batch mixing it with colour images (or augmented
    views) stacks it as three equal channels, and a batch of grey planes stays one plane per image."""
    rng = np.random.default_rng(3)
    requests = {}
    for name, shape in {"grey": (20, 20), "rgb": (20, 24, 3)}.items():
        path = tmp_path / f"{name}.png"
        path.write_bytes(encoded(Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)), "PNG"))
        requests[name] = ViewRequest(str(path), sha256_bytes(path.read_bytes()), 0)
    ours = Preprocessing(resize=16, crop=16, interpolation="bilinear", **IMAGENET)
    planes = ViewDataset([requests["grey"]] * 2, ours, grey_planes=True)
    batch, good, errors = collate([planes[0], planes[1]])
    assert batch.shape == (2, 1, 16, 16) and good == [0, 1] and errors == []
    mixed = ViewDataset([requests["grey"], requests["rgb"]], ours, grey_planes=True)
    batch, _, _ = collate([mixed[0], mixed[1]])
    expected, _, _ = collate([ViewDataset([requests[k]], ours)[0] for k in ("grey", "rgb")])
    assert batch.shape == (2, 3, 16, 16) and torch.equal(batch, expected)
    assert torch.equal(batch[0, 0], batch[0, 2]) and not torch.equal(batch[1, 0], batch[1, 2])


def test_a_fine_tune_flip_without_a_random_crop_starts_from_the_evaluation_pixels(tmp_path):
    """torch only augments: with finetune.augment's random resized crop off, a training image is the evaluation
    pixels (data/pixels.py), flipped or not."""
    from transfer_learning.finetune.data import AugmentedImages, augmentation
    from transfer_learning.params import FinetuneParams

    path = tmp_path / "photo.png"
    path.write_bytes(encoded(Image.fromarray(np.random.default_rng(5).integers(0, 256, (30, 44, 3), np.uint8)),
                             "PNG"))
    ours = Preprocessing(resize=36, crop=32, interpolation="bilinear", **IMAGENET)
    augment = augmentation(FinetuneParams(augment={"random_resized_crop": False, "hflip": True}).augment, ours)
    dataset = AugmentedImages([ViewRequest(str(path), sha256_bytes(path.read_bytes()), 0)], augment, ours, seed=0)
    plain = PlainPixels.of(ours)(ours.decode(path.read_bytes()))
    seen = set()
    for epoch in range(8):
        dataset.epoch = epoch
        pixels = dataset[0][0].numpy()
        flipped = np.array_equal(pixels, plain[:, :, ::-1])
        assert flipped or np.array_equal(pixels, plain)
        seen.add(flipped)
    assert seen == {True, False}
