"""reports/confusion/<model>.png drawn with Pillow: the layout of scikit-learn's ConfusionMatrixDisplay (counts in
viridis cells, true label down, predicted label across, class names as ticks, x ticks turned upright).

Pillow, not matplotlib: importing matplotlib and laying out its figure took 0.6-0.8 s of every evaluate run whose
predictions changed, i.e. of every one-head edit; this takes about 0.05 s. Same inputs, same bytes
(no timestamp or version in the PNG), which evaluate's keep-what-did-not-change check relies on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# matplotlib's viridis at 17 evenly spaced points (0, 1/16, ..., 1), interpolated linearly in between
VIRIDIS = np.array([(68, 1, 84), (72, 24, 106), (71, 45, 123), (66, 64, 134), (59, 82, 139), (51, 99, 141),
                    (44, 114, 142), (38, 130, 142), (33, 145, 140), (31, 160, 136), (40, 174, 128), (63, 188, 115),
                    (94, 201, 98), (132, 212, 75), (173, 220, 48), (216, 226, 25), (253, 231, 37)], np.float64)
WHITE, BLACK = (255, 255, 255), (0, 0, 0)
MAX_SIDE = 2400  # pixels of the matrix at most (matplotlib's figure was capped at 30 inches, 3,000 px)
MIN_COUNT_CELL, MIN_TICK_CELL = 16, 8  # smaller cells show no count, no class name


def viridis_rgb(values: np.ndarray) -> np.ndarray:
    """The colours (uint8 RGB in a last axis) of `values` in [0, 1]."""
    stops = np.linspace(0.0, 1.0, len(VIRIDIS))
    clipped = np.clip(values, 0.0, 1.0)
    channels = [np.interp(clipped, stops, VIRIDIS[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def viridis(value: float) -> tuple[int, int, int]:
    """The colour of `value` in [0, 1]."""
    return tuple(int(c) for c in viridis_rgb(np.asarray(value, np.float64)))


def draw_confusion(path: Path, counts: np.ndarray, classes: list[str], title: str) -> Path:
    """Writes counts[actual, predicted] as a PNG at `path`."""
    from PIL import Image, ImageDraw, ImageFont

    n = len(classes)
    cell = max(1, min(56, MAX_SIDE // max(n, 1)))  # many classes: smaller cells, then no counts, then no ticks
    font = ImageFont.load_default(size=max(8, min(14, cell // 3)))
    label_font, tick_font = ImageFont.load_default(size=14), ImageFont.load_default(size=min(14, cell))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    ticks = classes if cell >= MIN_TICK_CELL else []
    tick_width = max((int(measure.textlength(name, font=tick_font)) for name in ticks), default=0) + 8
    band = 24  # the axis titles' and the title's line
    left, top = band + tick_width, band + 8
    side = n * cell
    width, height = left + side + 16, top + side + tick_width + band

    image = Image.new("RGB", (width, height), WHITE)
    low, high = int(counts.min(initial=0)), int(counts.max(initial=0))
    cells = viridis_rgb((counts - low) / (high - low or 1)).repeat(cell, axis=0).repeat(cell, axis=1)
    image.paste(Image.fromarray(np.ascontiguousarray(cells), "RGB"), (left, top))
    draw = ImageDraw.Draw(image)
    middle = (high + low) / 2.0
    dark, light = viridis(0.0), viridis(1.0)
    if cell >= MIN_COUNT_CELL:
        for (actual, guess), count in np.ndenumerate(counts):
            draw.text((left + guess * cell + cell / 2, top + actual * cell + cell / 2), str(count), font=font,
                      anchor="mm", fill=light if count < middle else dark)
    draw.rectangle((left - 1, top - 1, left + side, top + side), outline=BLACK)
    for i, name in enumerate(ticks):  # y ticks, right-aligned beside their row
        draw.text((left - 6, top + i * cell + cell / 2), name, font=tick_font, anchor="rm", fill=BLACK)

    # x ticks and the y title: drawn across, then turned to read bottom to top (matplotlib's rotation=90)
    strip = Image.new("RGB", (tick_width, side), WHITE)
    strip_draw = ImageDraw.Draw(strip)
    for i, name in enumerate(ticks):
        strip_draw.text((tick_width - 6, i * cell + cell / 2), name, font=tick_font, anchor="rm", fill=BLACK)
    image.paste(strip.transpose(Image.Transpose.ROTATE_90), (left, top + side))
    draw.text((left + side / 2, height - band / 2), "Predicted label", font=label_font, anchor="mm", fill=BLACK)
    draw.text((left + side / 2, band / 2 + 4), title, font=label_font, anchor="mm", fill=BLACK)
    y_title = Image.new("RGB", (side, band), WHITE)
    ImageDraw.Draw(y_title).text((side / 2, band / 2), "True label", font=label_font, anchor="mm", fill=BLACK)
    image.paste(y_title.transpose(Image.Transpose.ROTATE_90), (0, top))

    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=False)
    return path
