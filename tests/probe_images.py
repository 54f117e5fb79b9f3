"""Writes the probe images (transfer_learning/data/probes/): one small file per decoding path the product reads,
hashed through the evaluation preprocessing into every fingerprint that depends on pixels (data/probes.py).

    .venv/bin/python -m tests.probe_images

The files are committed; this script remakes them. Remaking them with other library versions may give other bytes
(JPEG, WebP encoders): that changes every fingerprint once, as any change to a probe's pixels does.

tifffile writes LZW only with the imagecodecs package, so the LZW TIFF is tifffile's uncompressed file with its
strip LZW-encoded here (tiff_lzw_encode) and its Compression, StripOffsets and StripByteCounts tags rewritten.
`tiff_lzw_decode` is the matching decoder, which the tests hand to tifffile to stand for an installed LZW decoder.
"""
from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from transfer_learning.data.probes import PROBES_DIR

CLEAR, END = 256, 257


def tiff_lzw_encode(data: bytes) -> bytes:
    """TIFF's LZW as libtiff writes it: MSB-first codes of 9 to 12 bits, the width growing once the next entry
    would not fit, a Clear code when the table is full."""
    table = {bytes([i]): i for i in range(256)}
    next_code, width = 258, 9
    codes: list[tuple[int, int]] = [(CLEAR, 9)]
    current = b""
    for byte in data:
        candidate = current + bytes([byte])
        if candidate in table:
            current = candidate
            continue
        codes.append((table[current], width))
        table[candidate] = next_code
        next_code += 1
        if next_code == 4094:  # the table is full: start again
            codes.append((CLEAR, width))
            table = {bytes([i]): i for i in range(256)}
            next_code, width = 258, 9
        elif next_code > (1 << width) - 1:
            width += 1
        current = bytes([byte])
    if current:
        codes.append((table[current], width))
        # the decoder adds an entry after this code too, so the END code may need the next width
        if next_code + 1 > (1 << width) - 1:
            width += 1
    codes.append((END, width))
    bits = "".join(f"{code:0{size}b}" for code, size in codes)
    bits += "0" * (-len(bits) % 8)
    return int(bits, 2).to_bytes(len(bits) // 8, "big")


def tiff_lzw_decode(data: bytes, out=None) -> bytes:
    """The decoder of TIFF's LZW (with the early width change), as tifffile calls a decompressor: (data, out=...)."""
    value, length = int.from_bytes(data, "big"), len(data) * 8
    position, width = 0, 9
    table: list[bytes] = []
    previous: bytes | None = None
    output = bytearray()
    while position + width <= length:
        code = (value >> (length - position - width)) & ((1 << width) - 1)
        position += width
        if code == CLEAR:
            table = [bytes([i]) for i in range(256)] + [b"", b""]
            width, previous = 9, None
            continue
        if code == END:
            break
        if code < len(table):
            entry = table[code]
            if previous is not None:
                table.append(previous + entry[:1])
        else:  # the code being defined: previous + its own first byte
            entry = previous + previous[:1]
            table.append(entry)
        output += entry
        previous = entry
        if len(table) + 1 >= (1 << width) and width < 12:  # one entry behind the encoder
            width += 1
    return bytes(output)


def gradient(height: int, width: int, channels: int, top: int, seed: int) -> np.ndarray:
    """Smooth gradients and noise up to `top`: edges and flat areas, so that every resampling tap matters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 0.5 + 0.4 * np.sin(x / 2.5 + seed) * np.cos(y / 3.5)
    samples = base[..., None] + rng.normal(0, 0.08, (height, width, channels))
    samples[..., 1:] = samples[..., 1:][:, ::-1]  # channels differ
    return np.clip(samples * top, 0, top).squeeze(-1 if channels == 1 else ())


def scene(height: int, width: int, seed: int, linear: bool = False) -> Image.Image:
    """A photo-sized RGB image: smooth gradients under flat shapes and a one-pixel line, so that shrinking it
    (Pillow's antialiasing filter, wider than its enlarging one) has both edges and flat areas to average, in few
    bytes. linear: gradients a PNG filter predicts exactly (a PNG of this size stays a few KB)."""
    y, x = np.mgrid[0:height, 0:width]
    if linear:
        rgb = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 255 // (width + height - 2)], -1)
    else:
        u, v = x / max(height, width), y / max(height, width)
        rgb = 255 * np.stack([0.5 + 0.45 * np.sin(2.1 * u + seed) * np.cos(1.3 * v),
                              0.5 + 0.45 * np.cos(3.0 * v - u + seed), u * 0.6 + v * 0.3], -1).clip(0, 1)
    image = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    rng = np.random.default_rng(seed)
    for shape in range(6):
        x0, y0 = rng.integers(0, width - 20), rng.integers(0, height - 20)
        x1, y1 = x0 + rng.integers(8, width // 3), y0 + rng.integers(8, height // 3)
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if shape % 2 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    draw.line((0, 0, width, height), fill=(255, 255, 255), width=1)
    return image


def pil_bytes(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png16(samples: np.ndarray, alpha: bool = False, greyscale: bool = False) -> bytes:
    import png

    height, width = samples.shape[:2]
    planes = samples.shape[2] if samples.ndim == 3 else 1
    buffer = io.BytesIO()
    png.Writer(width, height, bitdepth=16, alpha=alpha, greyscale=greyscale).write(
        buffer, samples.reshape(height, width * planes).astype(np.uint16).tolist())
    return buffer.getvalue()


def tiff(samples: np.ndarray, **options) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, samples, **options)
    return buffer.getvalue()


def lzw_tiff(samples: np.ndarray) -> bytes:
    """An LZW-compressed TIFF of `samples` (one strip), through tifffile's uncompressed layout."""
    import tifffile

    data = bytearray(tiff(samples, photometric="rgb", rowsperstrip=samples.shape[0]))
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as handle:
        page = handle.pages[0]
        start, count = page.dataoffsets[0], page.databytecounts[0]
        tags = {code: (page.tags[code].valueoffset, "<H" if page.tags[code].dtype == 3 else "<I")
                for code in (259, 273, 279)}
    strip = tiff_lzw_encode(bytes(data[start:start + count]))
    for code, value in ((259, 5), (273, len(data)), (279, len(strip))):
        offset, layout = tags[code]
        data[offset:offset + struct.calcsize(layout)] = struct.pack(layout, value)
    return bytes(data + strip)


def exif_rotated_jpeg() -> bytes:
    """A JPEG whose EXIF Orientation is 6 (rotate 90° clockwise to view)."""
    image = Image.fromarray(gradient(14, 22, 3, 255, seed=6).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    return pil_bytes(image, "JPEG", quality=90, exif=exif.tobytes())


def palette_with_transparency() -> bytes:
    image = Image.fromarray(gradient(19, 25, 3, 255, seed=3).astype(np.uint8)).quantize(16)
    return pil_bytes(image, "PNG", transparency=0)


def probes() -> dict[str, bytes]:
    """File name -> bytes. Sizes are odd, portrait and landscape, one smaller than any crop, one a single pixel;
    high-bit files hold 12-bit values (the `auto` rule picks 12 bits) unless named otherwise. Most are enlarged to
    the resize; two are larger than any torchvision weights' resize on both sides and so are shrunk, as photos are
    (Pillow shrinks through another filter path than it enlarges), and one's short side is 256, the most common
    resize, so it is cropped without resampling."""
    twelve = 4095
    rgb16 = gradient(17, 23, 3, twelve, seed=11).astype(np.uint16)
    return {
        "grey8_31x17.png": pil_bytes(Image.fromarray(gradient(17, 31, 1, 255, seed=1).astype(np.uint8)), "PNG"),
        "rgb8_21x33.png": pil_bytes(Image.fromarray(gradient(33, 21, 3, 255, seed=2).astype(np.uint8)), "PNG"),
        "palette_transparency_25x19.png": palette_with_transparency(),
        "rgba8_18x27.png": pil_bytes(Image.fromarray(gradient(27, 18, 4, 255, seed=4).astype(np.uint8)), "PNG"),
        "grey_alpha8_15x9.png": pil_bytes(Image.fromarray(gradient(9, 15, 2, 255, seed=5).astype(np.uint8), "LA"),
                                          "PNG"),
        "cmyk_26x20.jpg": pil_bytes(Image.fromarray(gradient(20, 26, 4, 255, seed=7).astype(np.uint8), "CMYK"),
                                    "JPEG", quality=90),
        "rgb_29x13.jpg": pil_bytes(Image.fromarray(gradient(13, 29, 3, 255, seed=8).astype(np.uint8)), "JPEG",
                                   quality=90),
        "exif_rotated_22x14.jpg": exif_rotated_jpeg(),
        "grey16_19x23.png": png16(gradient(23, 19, 1, twelve, seed=9), greyscale=True),
        "grey16_23x19.tif": tiff(gradient(19, 23, 1, twelve, seed=10).astype(np.uint16)),
        "rgb16_23x17.png": png16(rgb16),
        "rgba16_full_range_13x11.png": png16(gradient(11, 13, 4, 65535, seed=12), alpha=True),
        "grey_alpha16_12x10.png": png16(gradient(10, 12, 2, twelve, seed=13), alpha=True, greyscale=True),
        "rgb16_23x17.tif": tiff(rgb16, photometric="rgb"),
        "rgb16_planar_23x17.tif": tiff(np.moveaxis(rgb16, -1, 0), photometric="rgb", planarconfig="separate"),
        "rgb16_lzw_23x17.tif": lzw_tiff(rgb16),
        "int32_14x18.tif": tiff(gradient(18, 14, 1, twelve, seed=14).astype(np.int32)),
        "int32_beyond_16_bits_9x11.tif": tiff(gradient(11, 9, 1, 3_000_000, seed=15).astype(np.int32)),
        "float32_fractions_16x12.tif": tiff(gradient(12, 16, 1, 1.0, seed=16).astype(np.float32)),
        "float32_values_12x16.tif": tiff(gradient(16, 12, 1, 900.0, seed=17).astype(np.float32)),
        "rgb8_9x7.bmp": pil_bytes(Image.fromarray(gradient(7, 9, 3, 255, seed=18).astype(np.uint8)), "BMP"),
        "palette_11x8.gif": pil_bytes(Image.fromarray(gradient(8, 11, 3, 255, seed=19).astype(np.uint8)), "GIF"),
        "rgb8_10x14.webp": pil_bytes(Image.fromarray(gradient(14, 10, 3, 255, seed=20).astype(np.uint8)), "WEBP",
                                     lossless=True),
        "grey8_tall_5x40.png": pil_bytes(Image.fromarray(gradient(40, 5, 1, 255, seed=21).astype(np.uint8)), "PNG"),
        "rgb8_1x1.png": pil_bytes(Image.new("RGB", (1, 1), (200, 30, 90)), "PNG"),
        "rgb_photo_600x450.jpg": pil_bytes(scene(450, 600, seed=22), "JPEG", quality=70),
        "rgb8_photo_300x280.png": pil_bytes(scene(280, 300, seed=23, linear=True), "PNG", optimize=True),
        "rgb_short_side_256_320x256.jpg": pil_bytes(scene(256, 320, seed=24), "JPEG", quality=70),
    }


def main() -> None:
    PROBES_DIR.mkdir(parents=True, exist_ok=True)
    made = probes()
    for stale in set(p.name for p in PROBES_DIR.iterdir()) - set(made):
        (PROBES_DIR / stale).unlink()
    for name, data in made.items():
        (PROBES_DIR / name).write_bytes(data)
    print(f"{len(made)} probe images, {sum(map(len, made.values())):,} bytes -> {PROBES_DIR}")


if __name__ == "__main__":
    main()
