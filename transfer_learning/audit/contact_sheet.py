"""Contact sheets: thumbnails of the images a list names, in a grid, each with its caption (given -> suggested
label, a similarity), drawn with Pillow. Images are decoded as every stage decodes them (data.bit_depth's rule);
one that cannot be read any more is drawn as a grey tile that says so, and the sheet is still written."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transfer_learning.data.decode import BadImage, BitDepth, decode

THUMB = 96  # pixels, the longer side
COLUMNS = 6
CAPTION_LINES = 2
LINE = 12  # pixels per caption line
PAD = 6
WHITE, GREY, BLACK = (255, 255, 255), (200, 200, 200), (0, 0, 0)


@dataclass(frozen=True)
class Tile:
    path: str
    caption: tuple[str, ...]  # at most CAPTION_LINES lines, cut to the tile's width


def thumbnail(path: str, bit_depth: BitDepth):
    from PIL import Image

    try:
        image = decode(Path(path).read_bytes(), bit_depth)
    except (OSError, BadImage):
        return None
    image = image.convert("RGB")
    image.thumbnail((THUMB, THUMB), Image.Resampling.BICUBIC if max(image.size) > THUMB else Image.Resampling.NEAREST)
    if max(image.size) < THUMB:  # 28-px images: enlarged, without smoothing, to be seen
        scale = THUMB / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.NEAREST)
    return image


def draw_sheet(target: Path, tiles: list[Tile], bit_depth: BitDepth, title: str, columns: int = COLUMNS) -> Path:
    from PIL import Image, ImageDraw, ImageFont

    font, title_font = ImageFont.load_default(size=10), ImageFont.load_default(size=14)
    cell_w, cell_h = THUMB + 2 * PAD, THUMB + 2 * PAD + CAPTION_LINES * LINE
    rows = max(1, -(-len(tiles) // columns))
    top = 24
    sheet = Image.new("RGB", (columns * cell_w, top + rows * cell_h), WHITE)
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, 5), title, fill=BLACK, font=title_font)
    for n, tile in enumerate(tiles):
        x, y = (n % columns) * cell_w + PAD, top + (n // columns) * cell_h + PAD
        image = thumbnail(tile.path, bit_depth)
        if image is None:
            draw.rectangle((x, y, x + THUMB - 1, y + THUMB - 1), fill=GREY)
            draw.text((x + 4, y + THUMB // 2 - 6), "unreadable", fill=BLACK, font=font)
        else:
            sheet.paste(image, (x + (THUMB - image.width) // 2, y + (THUMB - image.height) // 2))
        for line_number, line in enumerate(tile.caption[:CAPTION_LINES]):
            while line and draw.textlength(line, font=font) > cell_w - PAD:
                line = line[:-2] + "."
            draw.text((x, y + THUMB + 2 + line_number * LINE), line, fill=BLACK, font=font)
    target.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(target, optimize=True)
    return target
