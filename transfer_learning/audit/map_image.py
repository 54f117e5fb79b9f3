"""The map as a PNG (Pillow): one dot per image coloured by its label, a black ring around each flagged image, and a
legend of the classes. The same points are plots/audit/map.csv for `dvc plots show`."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SIDE = 720  # pixels of the plotting square
LEGEND = 170
# matplotlib's tab10, then tab20's lighter shades: 20 classes told apart; more classes cycle through them
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
           (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
           (219, 219, 141), (158, 218, 229)]


def draw_map(target: Path, points: np.ndarray, labels: np.ndarray, classes: list[str], flagged: np.ndarray,
             title: str) -> Path:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    image = Image.new("RGB", (SIDE + LEGEND, SIDE + 30), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title, fill=(0, 0, 0), font=ImageFont.load_default(size=14))
    low, high = (points.min(axis=0), points.max(axis=0)) if len(points) else (np.zeros(2), np.ones(2))
    span = np.where(high - low > 0, high - low, 1.0)
    xy = 12 + (points - low) / span * (SIDE - 24)
    xy[:, 1] = SIDE - xy[:, 1] + 30  # y up
    for (x, y), label in zip(xy, labels):
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=PALETTE[int(label) % len(PALETTE)])
    for x, y in xy[flagged]:
        draw.ellipse((x - 5, y - 5, x + 5, y + 5), outline=(0, 0, 0), width=1)
    for n, name in enumerate(classes[:(SIDE - 40) // 16]):
        y = 40 + 16 * n
        draw.rectangle((SIDE + 8, y, SIDE + 18, y + 10), fill=PALETTE[n % len(PALETTE)])
        draw.text((SIDE + 24, y - 2), name[:22], fill=(0, 0, 0), font=font)
    y = 40 + 16 * min(len(classes), (SIDE - 40) // 16) + 8
    draw.ellipse((SIDE + 8, y, SIDE + 18, y + 10), outline=(0, 0, 0))
    draw.text((SIDE + 24, y - 2), "flagged", fill=(0, 0, 0), font=font)
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target, optimize=True)
    return target
