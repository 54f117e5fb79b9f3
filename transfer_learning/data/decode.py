"""Decoding any image file a user may have into RGB (PIL and numpy only: prepare decodes every image without torch).

High-bit images (16-bit, 32-bit integer, float) are scaled to 8 bits by one rule, `data.bit_depth`, that every
stage applies alike (prepare, extract, fine-tune, advise, predict) through `Preprocessing.decode`:
- integer samples: white is 2**bits - 1, where bits is the forced `data.bit_depth` (8/10/12/14/16; values
  above it clip to white) or, under `auto`, the smallest of 8/10/12/14/16 bits that holds the image's maximum,
  so a 16-bit file holding 8- or 12-bit camera values is not nearly black. A 32-bit image whose maximum exceeds
  16 bits (no camera depth) is scaled by that maximum.
- float samples ('F'): all within [0, 1] means fractions of white (the float convention); otherwise they are
  read as integer samples, by the rule above.
Negative and non-finite samples are black. 8-bit images (L, RGB, P, ...) are not affected by the rule.
16-bit colour files (PNG RGB/RGBA/grey+alpha, TIFF with 16-bit samples) follow the same rule, all channels but
alpha together: PIL would keep only their top 8 bits, so they are decoded with pypng and tifffile instead (a TIFF
whose compression tifffile cannot read without the imagecodecs package, e.g. LZW, falls back to PIL, with a
warning). Alpha is dropped, as for 8-bit files.
"""
from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from transfer_learning.common.hashing import sha256_bytes

log = logging.getLogger(__name__)

HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
BIT_DEPTHS = (8, 10, 12, 14, 16)
BitDepth = Union[str, int]  # "auto" or one of BIT_DEPTHS: data.bit_depth
PNG_DEEP_COLOUR_TYPES = (2, 4, 6)  # IHDR colour types RGB, grey+alpha, RGBA (16-bit grey is PIL's I;16)
TIFF_BITS_PER_SAMPLE, TIFF_PHOTOMETRIC, TIFF_SAMPLES_PER_PIXEL = 258, 262, 277
TIFF_GREY_OR_RGB = (1, 2)  # Photometric MinIsBlack (grey + extra samples) and RGB; CMYK, YCbCr... stay with PIL


def is_bit_depth(value) -> bool:
    return value == "auto" or (type(value) is int and value in BIT_DEPTHS)


class BadImage(Exception):
    """The bytes are not a decodable image; the message says why."""


def decode(data: bytes, bit_depth: BitDepth, keep_grey: bool = False) -> Image.Image:
    """A fully decoded RGB image, or BadImage (empty, truncated, not an image, decompression bomb).
    `keep_grey`: an image that would be grey 'L' before going RGB stays 'L' (see `Preprocessing.decode`)."""
    if not data:
        raise BadImage("empty file")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only; PIL raises above 2x MAX_IMAGE_PIXELS
        if Image.MAX_IMAGE_PIXELS and image.width * image.height > Image.MAX_IMAGE_PIXELS:
            # PIL only warns between 1x and 2x; a warnings filter would not be thread-safe, so check here
            raise BadImage(f"decompression bomb: {image.width}x{image.height} pixels exceeds the limit of "
                           f"{Image.MAX_IMAGE_PIXELS} (PIL.Image.MAX_IMAGE_PIXELS)")
        if is_deep_colour(image, data):
            samples = deep_colour_samples(image.format, data)
            if samples is not None:
                return Image.fromarray(to_8_bits(samples, bit_depth, fractions=samples.dtype.kind == "f"))
        image.load()
    except BadImage:
        raise
    except Image.DecompressionBombError as error:
        raise BadImage(f"decompression bomb: {error}") from None
    except UnidentifiedImageError:
        raise BadImage("not a decodable image: not a format PIL can identify") from None
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise BadImage(f"not a decodable image: {type(error).__name__}: {error}") from None
    return to_rgb(image, bit_depth, keep_grey)


def read_checked(path: str, sha256: str, bit_depth: BitDepth, keep_grey: bool = False
                 ) -> tuple[Image.Image | None, str | None]:
    """A prepared image as `decode` gives it, read only if it still has the sha256 prepare recorded: (image, None),
    or (None, the reason with the path): unreadable, changed since prepare, not decodable."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        return None, f"{path}: cannot read ({error.strerror})"
    if sha256_bytes(data) != sha256:
        return None, f"{path}: changed since prepare (sha256 differs); run `dvc repro` to re-prepare"
    try:
        return decode(data, bit_depth, keep_grey), None
    except BadImage as error:
        return None, f"{path}: {error}"


def white_level(samples: np.ndarray, bit_depth: BitDepth) -> float:
    """The integer sample value that becomes 255 (see the module's docstring)."""
    if bit_depth != "auto":
        return float(2 ** bit_depth - 1)
    top = float(samples.max(initial=0.0))
    for bits in BIT_DEPTHS:
        if top <= 2 ** bits - 1:
            return float(2 ** bits - 1)
    return top


def to_8_bits(samples: np.ndarray, bit_depth: BitDepth, fractions: bool) -> np.ndarray:
    """uint8 samples by `bit_depth`'s rule; `fractions`: float samples all within [0, 1] are fractions of white."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = np.where(np.isfinite(samples), np.maximum(samples, 0.0), 0.0)
    white = 1.0 if fractions and samples.max(initial=0.0) <= 1.0 else white_level(samples, bit_depth)
    return np.clip(samples / white * 255.0 + 0.5, 0, 255).astype(np.uint8)


def is_deep_colour(image: Image.Image, data: bytes) -> bool:
    """A 16-bit colour (or grey+alpha) PNG or TIFF, told from its header: PIL would keep only the top 8 bits."""
    if image.format == "PNG":
        return data[24] == 16 and data[25] in PNG_DEEP_COLOUR_TYPES  # IHDR's bit depth and colour type
    if image.format == "TIFF" and image.mode not in HIGH_BIT_MODES:
        bits = image.tag_v2.get(TIFF_BITS_PER_SAMPLE, (1,))
        bits = bits if isinstance(bits, tuple) else (bits,)
        return (image.tag_v2.get(TIFF_SAMPLES_PER_PIXEL, 1) >= 2 and 16 in bits
                and image.tag_v2.get(TIFF_PHOTOMETRIC) in TIFF_GREY_OR_RGB)
    return False


_WARNED: set[str] = set()


@contextmanager
def warnings_held_back() -> Iterator[None]:
    """Decoding without this module's once-per-process warnings: the probe images (data/probes.py) go through
    every decoding path at each start, and the warning is for the user's own files, when one of them takes it."""
    warned, disabled = set(_WARNED), log.disabled
    log.disabled = True
    try:
        yield
    finally:
        log.disabled = disabled
        _WARNED.clear()
        _WARNED.update(warned)


def deep_colour_samples(format: str, data: bytes) -> np.ndarray | None:
    """The colour samples (height, width, 3) of a 16-bit colour PNG or TIFF (grey is repeated, alpha dropped), or
    None for a TIFF compression tifffile cannot read without imagecodecs (the caller then decodes with PIL)."""
    if format == "PNG":
        import png

        width, height, pixels, info = png.Reader(bytes=data).read_flat()  # raw values: sBIT is not applied
        samples = np.frombuffer(pixels, dtype=np.uint16).reshape(height, width, info["planes"])
    else:
        import tifffile

        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            page = tiff.pages[0]
            try:
                samples = page.asarray()
            except ValueError as error:
                if "imagecodecs" not in str(error):
                    raise
                if str(error) not in _WARNED:  # once per process and compression, not once per image
                    _WARNED.add(str(error))
                    log.warning("16-bit colour TIFF files are decoded by PIL to their top 8 bits where %s, so "
                                "data.bit_depth does not apply to them (12-bit values come out nearly black); "
                                "`pip install imagecodecs` lets tifffile read them in full", error)
                return None
            if page.axes.startswith("S"):  # planar configuration: one plane per sample
                samples = np.moveaxis(samples, 0, -1)
    colour = samples[..., :3] if samples.shape[-1] >= 3 else samples[..., :1]
    return np.repeat(colour, 3, axis=-1) if colour.shape[-1] == 1 else colour


def to_rgb(image: Image.Image, bit_depth: BitDepth, keep_grey: bool = False) -> Image.Image:
    """RGB from any PIL mode; high-bit images are scaled to 8 bits by `bit_depth`'s rule instead of clipped.
    `keep_grey`: a grey 'L' result is returned as it is rather than as three copies of its plane."""
    if image.mode in HIGH_BIT_MODES:
        image = Image.fromarray(to_8_bits(np.asarray(image), bit_depth, fractions=image.mode == "F"))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" or (keep_grey and image.mode == "L") else image.convert("RGB")
