"""The probe images: a small fixed set of files, committed in `probes/` beside this module, one per decoding path the
pipeline reads (8-bit grey, RGB, palette with transparency, RGBA, CMYK and EXIF-rotated JPEG, 16-bit grey and colour
PNG and TIFF, uncompressed, planar and LZW, 32-bit integer and float TIFF, BMP, GIF, WebP, odd and tiny sizes),
and per resampling path: most are enlarged to the resize, two photo-sized ones are shrunk (as photos are: Pillow
shrinks through its antialiasing filter path, not the one it enlarges with) and one whose short side is 256 is
cropped without resampling. tests/probe_images.py writes them.

`probe_digest` runs them through the evaluation preprocessing (data/pixels.py) with the code and libraries of this
very process, and hashes the resulting model inputs. Every fingerprint that depends on pixels holds it, so a change
of code or library that changes any probe's pixels (Pillow's resampling, the bit-depth rule, a decoder installed or
not) changes the fingerprint, and one that changes none leaves every stored row reusable.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from transfer_learning.data.decode import BadImage, warnings_held_back
from transfer_learning.data.pixels import NormalizeTable, evaluation_pixels

PROBES_DIR = Path(__file__).resolve().parent / "probes"


def probe_files() -> list[Path]:
    files = sorted(p for p in PROBES_DIR.iterdir() if p.is_file()) if PROBES_DIR.is_dir() else []
    if not files:
        raise RuntimeError(f"{PROBES_DIR} holds no probe images: the installation is incomplete (they are committed "
                           "in the repository; `python -m tests.probe_images` writes them)")
    return files


def probe_digest(preprocessing) -> str:
    """sha256 of the probes' model inputs under `preprocessing` (a data.images.Preprocessing: resize, crop,
    interpolation, mean, std, bit_depth), computed once per process and preprocessing."""
    return _digest(preprocessing.resize, preprocessing.crop, preprocessing.interpolation, tuple(preprocessing.mean),
                   tuple(preprocessing.std), preprocessing.bit_depth)


@functools.lru_cache(maxsize=None)
def _digest(resize: int, crop: int, interpolation: str, mean: tuple, std: tuple, bit_depth) -> str:
    preprocessing = _Spec(resize, crop, interpolation, mean, std, bit_depth)
    normalize = NormalizeTable.of(preprocessing)
    hashed = hashlib.sha256()
    with warnings_held_back():
        for path in probe_files():
            hashed.update(path.name.encode() + b"\0")
            try:
                inputs = normalize.inputs([evaluation_pixels(path.read_bytes(), preprocessing)])
            except BadImage as error:  # a decoder gone is a change of pixels too
                hashed.update(f"bad image: {error}\0".encode())
                continue
            hashed.update(f"{inputs.dtype.str} {inputs.shape}\0".encode())
            hashed.update(inputs.tobytes())
    return hashed.hexdigest()


class _Spec:
    """The preprocessing's fields the evaluation preprocessing reads."""

    def __init__(self, resize, crop, interpolation, mean, std, bit_depth):
        self.resize, self.crop, self.interpolation = resize, crop, interpolation
        self.mean, self.std, self.bit_depth = mean, std, bit_depth
