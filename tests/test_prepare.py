"""prepare: real image files of every kind -> manifest.csv, classes.json, rejected.csv, metrics/prepare.json."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import struct
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import prepare
from tests.conftest import REPO
from transfer_learning.common.errors import UserError
from transfer_learning.data import decode as decoding
from transfer_learning.data import manifest

MANIFEST = Path("data/prepared/manifest.csv")
CLASSES = Path("data/prepared/classes.json")
REJECTED = Path("data/prepared/rejected.csv")
DECODING = Path("data/prepared/decoding.json")
METRICS = Path("metrics/prepare.json")


# ---------------------------------------------------------------- helpers: real files


def noise(seed: int, size: int = 16, channels: int = 3) -> np.ndarray:
    """Distinct random pixels, so that no two helper images share bytes."""
    shape = (size, size, channels) if channels > 1 else (size, size)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def save(image: Image.Image, path: Path, format: str | None = None, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=format, **options)
    return path


def rgb(path: Path, seed: int, size: int = 16) -> Path:
    return save(Image.fromarray(noise(seed, size)), path)


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def decompression_bomb_png(side: int = 30000) -> bytes:
    """A valid PNG header announcing side x side 1-bit grayscale pixels, with a tiny IDAT."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # width, height, bit depth 1, grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def plain_class(folder: Path, count: int, seed: int) -> list[Path]:
    return [rgb(folder / f"img{i:03d}.png", seed * 1000 + i, size=8) for i in range(count)]


def read_manifest() -> list[dict]:
    with open(MANIFEST, newline="") as handle:
        return list(csv.DictReader(handle))


def read_rejected() -> dict[str, str]:
    with open(REJECTED, newline="") as handle:
        return {row["path"]: row["reason"] for row in csv.DictReader(handle)}


def metrics() -> dict:
    return json.loads(METRICS.read_text())


def rel(path: Path) -> str:
    return path.resolve().relative_to(Path.cwd().resolve()).as_posix()


def rel_link(link: Path) -> str:
    """A symbolic link's own path, as rejected.csv names it (not its target's)."""
    return (link.parent.resolve() / link.name).relative_to(Path.cwd().resolve()).as_posix()


def run_prepare(project, **data) -> list[dict]:
    project.params(data={"per_class": None, **data})
    prepare.main()
    return read_manifest()


# ---------------------------------------------------------------- folder source: every kind of file


def good_images(root: Path) -> list[Path]:
    """One file per mode and extension, some nested deeper inside the class folder."""
    alpha = root / "alpha"
    palette = Image.fromarray(noise(3)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    sixteen = Image.fromarray((np.arange(256, dtype=np.uint16).reshape(16, 16) * 257))
    assert sixteen.mode == "I;16"
    return [
        save(Image.fromarray(noise(1, channels=1), mode="L"), alpha / "gray.png"),
        save(palette, alpha / "palette.png"),
        save(transparent, alpha / "nested" / "transparent.gif"),
        save(Image.fromarray(noise(4, channels=4), mode="RGBA"), alpha / "rgba.png"),
        save(sixteen, alpha / "deep" / "er" / "sixteen.png"),
        save(Image.fromarray(noise(6, channels=4), mode="CMYK"), alpha / "cmyk.jpg", quality=90),
        save(Image.fromarray(noise(7)), alpha / "photo.jpeg"),
        save(Image.fromarray(noise(8)), alpha / "bitmap.bmp"),
        save(Image.fromarray(noise(9)), alpha / "web.webp"),
        save(Image.fromarray(noise(10)), alpha / "scan.tif"),
        save(Image.fromarray(noise(11)), alpha / "nested" / "scan2.tiff"),
        save(Image.fromarray(noise(12)), alpha / "UPPER.PNG", format="PNG"),
        save(Image.fromarray(noise(13), mode="RGB").convert("P"), alpha / "anim.gif"),
        *plain_class(root / "beta", 12, seed=2),
    ]


def bad_images(root: Path) -> dict[Path, str]:
    """Broken files inside a class that also has good ones; value: a word the reason must contain."""
    alpha = root / "alpha"
    png = encoded(Image.fromarray(noise(20, size=64)), "PNG")
    jpeg = encoded(Image.fromarray(noise(21, size=64)), "JPEG", quality=95)
    return {
        write_bytes(alpha / "zero.png", b""): "empty",
        write_bytes(alpha / "cut.png", png[: len(png) // 2]): "decodable",
        write_bytes(alpha / "cut.jpg", jpeg[: len(jpeg) // 2]): "decodable",
        write_bytes(alpha / "notes.jpg", b"these are my notes, not a photo\n" * 10): "decodable",
        write_bytes(alpha / "nested" / "bomb.png", decompression_bomb_png()): "decompression bomb",
    }


def test_crafted_png_is_a_decompression_bomb_for_pil(tmp_path):
    path = write_bytes(tmp_path / "bomb.png", decompression_bomb_png())
    assert path.stat().st_size < 200
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    with pytest.raises(decoding.BadImage, match="decompression bomb"):
        decoding.decode(path.read_bytes(), "auto")


def test_crafted_warning_sized_bomb_is_refused_too(tmp_path):
    """Between MAX_IMAGE_PIXELS and twice that, PIL only warns; decode must still refuse it."""
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)
    data = decompression_bomb_png(side)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(Image.DecompressionBombWarning):
            Image.open(io.BytesIO(data))
    with pytest.raises(decoding.BadImage, match="decompression bomb"):
        decoding.decode(data, "auto")


def test_folder_source_accepts_every_mode_and_rejects_broken_files(project):
    root = project.root / "photos"
    good = good_images(root)
    bad = bad_images(root)
    readme = root / "alpha" / "README.txt"
    readme.write_text("not an image extension: skipped, and listed as skipped\n")
    bad[readme] = "not an image file name"

    modes = {p.name: Image.open(p).mode for p in good}
    assert {modes[n] for n in ("gray.png", "palette.png", "rgba.png", "sixteen.png", "cmyk.jpg")} == {
        "L", "P", "RGBA", "I;16", "CMYK"
    }
    assert modes["palette.png"] == "P" and modes["transparent.gif"] == "P" and modes["cmyk.jpg"] == "CMYK"

    rows = run_prepare(project, source="photos")

    assert {r["path"] for r in rows} == {rel(p) for p in good}
    assert json.loads(CLASSES.read_text()) == ["alpha", "beta"]
    assert Counter(r["label"] for r in rows) == {"alpha": 13, "beta": 12}
    for row in rows:
        assert row["sha256"] == hashlib.sha256(Path(row["path"]).read_bytes()).hexdigest()
        assert row["split"] in ("train", "val", "test")
        assert decoding.decode(Path(row["path"]).read_bytes(), "auto").mode == "RGB"

    rejected = read_rejected()
    assert set(rejected) == {rel(p) for p in bad}
    for path, word in bad.items():
        assert word in rejected[rel(path)], rejected[rel(path)]
    written = metrics()
    assert written["rejected"] == len(bad) and written["duplicates"] == 0
    assert written["images"] == len(good) and written["classes"] == 2
    assert written["train"] + written["val"] + written["test"] == len(good)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_to_rgb_scales_16_bit_instead_of_clipping(mode):
    pixels = np.array([[65535, 32768, 0, 1000]], dtype=np.uint16)
    order = ">u2" if mode == "I;16B" else "<u2"
    image = Image.frombytes(mode, (4, 1), pixels.astype(order).tobytes())
    assert image.mode == mode
    out = decoding.to_rgb(image, "auto")
    assert out.mode == "RGB"
    channel = np.asarray(out)[0, :, 0]
    assert channel[0] == 255 and abs(int(channel[1]) - 128) <= 1 and channel[2] == 0
    assert abs(int(channel[3]) - 4) <= 1  # 1000/65535 of full scale, not clipped to 255
    assert (np.asarray(out)[..., 0] == np.asarray(out)[..., 2]).all()


def test_16_bit_png_file_decodes_scaled():
    """Scaling is by the bit depth that holds the maximum, not by the maximum itself: a flat mid-grey stays
    mid-grey."""
    flat = np.full((4, 4), 32768, dtype=np.uint16)
    data = encoded(Image.fromarray(flat), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = np.asarray(decoding.decode(data, "auto"))
    assert out.shape == (4, 4, 3) and abs(int(out.max()) - 128) <= 1 and abs(int(out.min()) - 128) <= 1


def test_exact_duplicates_keep_one_copy(project):
    root = project.root / "photos"
    plain_class(root / "a", 10, seed=1)
    plain_class(root / "b", 10, seed=2)
    original = rgb(root / "a" / "x.png", seed=99, size=8)
    copies = [root / "a" / "x_copy.png", root / "b" / "sub" / "y.png"]
    for copy in copies:
        write_bytes(copy, original.read_bytes())

    rows = run_prepare(project, source="photos")

    paths = {r["path"] for r in rows}
    assert len(paths & {rel(original), *(rel(c) for c in copies)}) == 1
    assert len(rows) == 21 and len({r["sha256"] for r in rows}) == len(rows)
    written = metrics()
    assert written["duplicates"] == 2 and written["rejected"] == 0 and written["images"] == 21
    rejected = read_rejected()
    assert len(rejected) == 2 and all("duplicate" in reason for reason in rejected.values())


def test_class_with_only_bad_images_fails_naming_it(project):
    root = project.root / "photos"
    plain_class(root / "alpha", 10, seed=1)
    broken = [write_bytes(root / "gamma" / "zero.png", b""), write_bytes(root / "gamma" / "text.jpg", b"hello\n")]
    project.params(data={"source": "photos", "per_class": None})

    with pytest.raises(UserError, match="gamma"):
        prepare.main()

    assert set(read_rejected()) == {rel(p) for p in broken}


@pytest.mark.parametrize("content", [None, "notes.txt"])
def test_class_folder_without_images_fails_before_any_output(project, content):
    root = project.root / "photos"
    plain_class(root / "alpha", 10, seed=1)
    empty = root / "empty_class"
    empty.mkdir()
    if content:
        (empty / content).write_text("no images here\n")
    project.params(data={"source": "photos", "per_class": None})

    with pytest.raises(UserError) as caught:
        prepare.main()

    assert "empty_class" in str(caught.value)
    assert not Path("data/prepared").exists() and not METRICS.exists()


# ---------------------------------------------------------------- CSV source


def csv_dataset(project, rows: list[tuple], header: str = "path,label,split") -> str:
    """Images under ds/img (paths in the CSV relative to the CSV's folder); returns data.source."""
    folder = project.root / "ds"
    folder.mkdir(exist_ok=True)
    lines = [header] + [",".join(str(v) for v in row) for row in rows]
    (folder / "list.csv").write_text("\n".join(lines) + "\n")
    return "ds/list.csv"


def test_csv_source_keeps_given_splits_and_draws_the_rest(project):
    rows = []
    for c, label in enumerate(("cat", "dog")):
        for i in range(14):
            rgb(project.root / "ds" / "img" / f"{label}{i}.png", seed=c * 100 + i, size=8)
            split = ("train", "val", "test")[i] if i < 3 else ""  # the first three are fixed, the rest drawn
            rows.append((f"img/{label}{i}.png", label, split))
    source = csv_dataset(project, rows)

    manifest = run_prepare(project, source=source)

    by_path = {r["path"]: r for r in manifest}
    assert len(by_path) == 28
    for path, label, split in rows:
        row = by_path[f"ds/{path}"]
        assert row["label"] == label
        if split:
            assert row["split"] == split
        assert row["sha256"] == hashlib.sha256(Path(row["path"]).read_bytes()).hexdigest()
    assert {r["split"] for r in manifest} == {"train", "val", "test"}
    assert json.loads(CLASSES.read_text()) == ["cat", "dog"]


def test_csv_source_with_every_split_given(project):
    rows = []
    for i in range(6):
        rgb(project.root / "ds" / f"{i}.png", seed=i, size=8)
        rows.append((f"{i}.png", "ab"[i % 2], ("train", "train", "val", "val", "test", "test")[i]))
    manifest = run_prepare(project, source=csv_dataset(project, rows))
    assert {r["path"]: r["split"] for r in manifest} == {f"ds/{p}": s for p, _, s in rows}


def test_csv_source_without_split_column(project):
    rows = []
    for i in range(20):
        rgb(project.root / "ds" / f"{i}.png", seed=i, size=8)
        rows.append((f"{i}.png", "ab"[i % 2]))
    manifest = run_prepare(project, source=csv_dataset(project, rows, header="path,label"))
    assert len(manifest) == 20 and {r["split"] for r in manifest} == {"train", "val", "test"}


def test_csv_missing_path_names_the_file_and_line(project):
    rgb(project.root / "ds" / "a.png", seed=1, size=8)
    source = csv_dataset(project, [("a.png", "x", ""), ("nowhere.png", "x", "")])
    project.params(data={"source": source, "per_class": None})
    with pytest.raises(UserError) as caught:
        prepare.main()
    message = str(caught.value)
    assert "list.csv" in message and "line 3" in message and "nowhere.png" in message


def test_csv_bad_split_value_fails(project):
    rgb(project.root / "ds" / "a.png", seed=1, size=8)
    source = csv_dataset(project, [("a.png", "x", "training")])
    project.params(data={"source": source, "per_class": None})
    with pytest.raises(UserError) as caught:
        prepare.main()
    message = str(caught.value)
    assert "list.csv" in message and "line 2" in message and "'training'" in message and "train" in message


# ---------------------------------------------------------------- stratified split, seed, cap


@pytest.fixture
def three_classes(project) -> Path:
    root = project.root / "photos"
    for c, label in enumerate(("ant", "bee", "cow")):
        plain_class(root / label, 40, seed=c + 1)
    return root


def splits_by_label(rows: list[dict]) -> dict[str, Counter]:
    out: dict[str, Counter] = {}
    for row in rows:
        out.setdefault(row["label"], Counter())[row["split"]] += 1
    return out


def test_stratified_split_respects_fractions_per_class(project, three_classes):
    rows = run_prepare(project, source="photos", val_fraction=0.2, test_fraction=0.2, seed=0)
    assert len(rows) == 120
    per_label = splits_by_label(rows)
    assert set(per_label) == {"ant", "bee", "cow"}
    for label, counts in per_label.items():
        assert set(counts) == {"train", "val", "test"}, label
        assert abs(counts["val"] - 8) <= 1 and abs(counts["test"] - 8) <= 1, (label, counts)
        assert sum(counts.values()) == 40
    written = metrics()
    assert (written["train"], written["val"], written["test"]) == (72, 24, 24)


def test_same_seed_same_manifest_other_seed_other_split(project, three_classes):
    run_prepare(project, source="photos", seed=7)
    first = MANIFEST.read_bytes()
    run_prepare(project, source="photos", seed=7)
    assert MANIFEST.read_bytes() == first
    run_prepare(project, source="photos", seed=8)
    again = MANIFEST.read_bytes()
    assert again != first
    with open(MANIFEST, newline="") as handle:
        other = {r["path"]: r["split"] for r in csv.DictReader(handle)}
    same = {r["path"]: r["split"] for r in csv.DictReader(io.StringIO(first.decode()))}
    assert set(other) == set(same) and other != same


def test_per_class_cap(project, three_classes):
    rows = run_prepare(project, source="photos", per_class=25, seed=3)
    assert Counter(r["label"] for r in rows) == {"ant": 25, "bee": 25, "cow": 25}
    assert metrics()["max_per_class"] == 25 and metrics()["min_per_class"] == 25
    chosen = {r["path"] for r in rows}
    assert {r["path"] for r in run_prepare(project, source="photos", per_class=25, seed=3)} == chosen


def test_per_class_cap_larger_than_class_keeps_all(project, three_classes):
    rows = run_prepare(project, source="photos", per_class=1000)
    assert len(rows) == 120
    assert metrics()["capped"] == {} and metrics()["available"] == 120


def test_a_folder_is_used_whole_under_per_class_auto_and_keeps_its_proportions(project, caplog):
    """auto caps only the built-in demo sources: a folder with more than 300 images in a class keeps them all,
    and its classes keep their proportions in every split (no balancing)."""
    root = project.root / "photos"
    plain_class(root / "many", 320, seed=1)
    plain_class(root / "few", 150, seed=2)

    rows = run_prepare(project, source="photos", per_class="auto")

    assert Counter(r["label"] for r in rows) == {"many": 320, "few": 150}
    for split in ("train", "val", "test"):
        counts = Counter(r["label"] for r in rows if r["split"] == split)
        assert abs(counts["many"] / sum(counts.values()) - 320 / 470) < 0.02, (split, counts)
    written = metrics()
    assert written["per_class_cap"] is None and written["capped"] == {}
    assert written["available"] == written["images"] == 470
    assert written["per_class_cap_from"] == "data.per_class: auto, a folder or CSV is used whole"
    assert "at most" not in caplog.text


def test_an_explicit_cap_warns_and_records_what_it_dropped_per_class(project, caplog):
    root = project.root / "photos"
    plain_class(root / "ant", 40, seed=1)
    plain_class(root / "bee", 30, seed=2)
    plain_class(root / "cow", 10, seed=3)

    rows = run_prepare(project, source="photos", per_class=25)

    assert Counter(r["label"] for r in rows) == {"ant": 25, "bee": 25, "cow": 10}
    written = metrics()
    assert written["capped"] == {"ant": {"kept": 25, "available": 40}, "bee": {"kept": 25, "available": 30}}
    assert written["per_class_cap"] == 25 and written["per_class_cap_from"] == "data.per_class: 25"
    assert written["available"] == 80 and written["images"] == 60
    warning = next(r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "at most" in r.getMessage())
    assert warning.startswith("photos: at most 25 images per class (data.per_class: 25): 60 of 80 images kept")
    assert "ant 25 of 40" in warning and "bee 25 of 30" in warning and "cow" not in warning


def csv_of_two_classes(project, many: int, few: int) -> str:
    rows = []
    for c, (label, count) in enumerate((("cat", many), ("dog", few))):
        for i in range(count):
            rgb(project.root / "ds" / "img" / f"{label}{i}.png", seed=c * 1000 + i, size=8)
            rows.append((f"img/{label}{i}.png", label))
    return csv_dataset(project, rows, header="path,label")


def test_a_csv_is_used_whole_under_auto_and_capped_only_when_asked(project, caplog):
    source = csv_of_two_classes(project, many=30, few=12)

    assert Counter(r["label"] for r in run_prepare(project, source=source, per_class="auto")) == {"cat": 30, "dog": 12}
    assert metrics()["capped"] == {} and "at most" not in caplog.text

    rows = run_prepare(project, source=source, per_class=10)

    assert Counter(r["label"] for r in rows) == {"cat": 10, "dog": 10}
    assert metrics()["capped"] == {"cat": {"kept": 10, "available": 30}, "dog": {"kept": 10, "available": 12}}
    assert "cat 10 of 30, dog 10 of 12" in caplog.text


# ---------------------------------------------------------------- built-in sources


def test_builtin_digits(project):
    """Every digit (8x8 pixels, at most 183 per class) is kept: auto's 300 per class drops none of them, and 8 px
    is data.min_side's default."""
    rows = run_prepare(project, source="digits", per_class="auto")
    assert len(rows) == 1797
    assert json.loads(CLASSES.read_text()) == [str(d) for d in range(10)]
    assert min(Counter(r["label"] for r in rows).values()) == 174
    for row in rows:
        path = Path(row["path"])
        assert path.suffix == ".png" and path.is_file()
        assert Path("data/prepared/images") in path.parents
        assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert Image.open(rows[0]["path"]).size == (8, 8)
    written = metrics()
    assert written["classes"] == 10 and written["images"] == written["available"] == 1797
    assert written["rejected"] == 0 and written["rejected_by_kind"] == {} and written["capped"] == {}
    assert written["per_class_cap"] == 300
    assert written["per_class_cap_from"] == "data.per_class: auto, the demo's size for a built-in source"

    assert Counter(r["label"] for r in run_prepare(project, source="digits", per_class=20)) == {
        str(d): 20 for d in range(10)}


def test_fashion_mnist_classes_and_files_are_torchvisions():
    """prepare names the classes and checks the extracted files without importing torchvision: the same lists."""
    from torchvision.datasets import FashionMNIST

    from transfer_learning.data import sources

    assert list(sources.FASHION_MNIST_CLASSES) == FashionMNIST.classes
    assert set(sources.FASHION_MNIST_FILES) == {Path(url).stem for url, _ in FashionMNIST.resources}


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist missing")
def test_builtin_fashion_mnist(project):
    rows = run_prepare(project, source="fashion-mnist", per_class=10)
    assert len(rows) == 100
    classes = json.loads(CLASSES.read_text())
    assert len(classes) == 10 and "T-shirt/top" in classes and "Ankle boot" in classes
    assert Counter(r["label"] for r in rows) == {c: 10 for c in classes}
    for row in rows:
        path = Path(row["path"])
        assert Path("data/prepared/images") in path.parents
        with Image.open(path) as image:
            assert image.size == (28, 28)
        assert decoding.decode(path.read_bytes(), "auto").size == (28, 28)
    assert metrics()["rejected"] == 0
    assert metrics()["capped"] == {c: {"kept": 10, "available": 7000} for c in classes}


def test_raising_per_class_only_adds_images():
    from transfer_learning.data.sources import Candidate, cap_per_class

    pool = [Candidate(Path(f"{label}/{i}.png"), label) for label in "abc" for i in range(100)]
    small = {c.path for c in cap_per_class(pool, 10, seed=3)}
    large = {c.path for c in cap_per_class(pool, 11, seed=3)}
    assert len(small) == 30 and len(large) == 33 and small < large
    assert small != {c.path for c in cap_per_class(pool, 10, seed=4)}


# ---------------------------------------------------------------- every file not used is listed, with the reason


def test_files_that_are_not_images_and_images_too_small_are_listed_with_the_reason(project, caplog):
    root = project.root / "photos"
    plain_class(root / "a", 10, seed=1)
    plain_class(root / "b", 10, seed=2)
    notes = root / "a" / "notes.txt"
    notes.write_text("taken on the beach\n")
    tiny = save(Image.fromarray(noise(3, size=3)), root / "b" / "tiny.png")
    narrow = save(Image.fromarray(noise(4)[:7, :]), root / "b" / "narrow.png")  # 16 wide, 7 high
    loose = rgb(root / "unsorted.png", seed=5)

    rows = run_prepare(project, source="photos")

    assert len(rows) == 20
    with open(REJECTED, newline="") as handle:
        listed = {row["path"]: (row["kind"], row["reason"]) for row in csv.DictReader(handle)}
    assert set(listed) == {rel(notes), rel(tiny), rel(narrow), rel(loose)}
    assert listed[rel(notes)][0] == "extension" and ".png" in listed[rel(notes)][1]
    assert listed[rel(tiny)] == ("too_small", "3x3 pixels: the shorter side is below data.min_side (8), too small "
                                              "to show what the backbone learnt to see")
    assert listed[rel(narrow)][0] == "too_small" and "16x7" in listed[rel(narrow)][1]
    assert listed[rel(loose)][0] == "outside_class_folder"
    written = metrics()
    assert written["rejected_by_kind"] == {"extension": 1, "outside_class_folder": 1, "too_small": 2}
    assert written["rejected"] == 4 and written["min_side"] == 8
    assert "4 file(s) of photos not used" in caplog.text
    assert "1 extension, 1 outside_class_folder, 2 too_small" in caplog.text

    rows = run_prepare(project, source="photos", min_side=3)
    assert {rel(tiny), rel(narrow)} <= {r["path"] for r in rows}
    assert metrics()["rejected_by_kind"] == {"extension": 1, "outside_class_folder": 1}


def test_a_csv_row_is_decoded_whatever_its_extension_and_checked_for_size(project):
    """A CSV names its files: a PNG saved as .dat is an image; a tiny one is rejected as in a folder."""
    rows = []
    for i in range(20):
        rgb(project.root / "ds" / f"{i}.png", seed=i, size=8)
        rows.append((f"{i}.png", "ab"[i % 2]))
    save(Image.fromarray(noise(30)), project.root / "ds" / "odd.dat", format="PNG")
    save(Image.fromarray(noise(31, size=4)), project.root / "ds" / "small.png")
    rows += [("odd.dat", "a"), ("small.png", "b")]

    manifest_rows = run_prepare(project, source=csv_dataset(project, rows, header="path,label"))

    assert "ds/odd.dat" in {r["path"] for r in manifest_rows} and len(manifest_rows) == 21
    assert list(read_rejected()) == ["ds/small.png"]
    assert metrics()["rejected_by_kind"] == {"too_small": 1}


# ---------------------------------------------------------------- the bit-depth rule, recorded for every stage


@pytest.mark.parametrize("bit_depth", ["auto", 12])
def test_prepare_records_the_bit_depth_rule(project, three_classes, bit_depth):
    run_prepare(project, source="photos", bit_depth=bit_depth)
    assert json.loads(DECODING.read_text()) == {"bit_depth": bit_depth}
    assert manifest.read_bit_depth() == bit_depth
    assert metrics()["bit_depth"] == bit_depth


@pytest.mark.parametrize("content, word", [(None, "not found"), ("{\"bit_depth\": 9}\n", "valid: auto"),
                                           ("[12]\n", "expected"), ("{\"bit_depth\": \n", "expected")])
def test_a_missing_or_edited_decoding_json_is_a_clear_error(project, content, word):
    if content is not None:
        write_bytes(DECODING, content.encode())
    with pytest.raises(UserError, match=word) as caught:
        manifest.read_bit_depth()
    assert "decoding.json" in str(caught.value)


# ---------------------------------------------------------------- file names, links, atomic writes


def bytes_named_png(path: bytes, seed: int) -> bytes:
    """A good PNG at a non-UTF-8 path, created the only way such a name can be: through the bytes API."""
    handle = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(handle, encoded(Image.fromarray(noise(seed, size=8)), "PNG"))
    finally:
        os.close(handle)
    return path


def test_non_utf8_file_name_is_a_rejected_row_not_a_crash(project):
    root = project.root / "photos"
    plain_class(root / "a", 10, seed=1)
    plain_class(root / "b", 10, seed=2)
    bytes_named_png(os.fsencode(root / "a") + b"/caf\xe9.png", seed=3)

    rows = run_prepare(project, source="photos")

    assert len(rows) == 20
    rejected = read_rejected()
    assert list(rejected) == ["photos/a/caf\\xe9.png"] and "UTF-8" in rejected["photos/a/caf\\xe9.png"]
    MANIFEST.read_bytes().decode("utf-8")
    REJECTED.read_bytes().decode("utf-8")
    assert metrics()["rejected"] == 1


def test_class_folder_with_a_non_utf8_name_fails_naming_it_printably(project):
    root = project.root / "photos"
    plain_class(root / "a", 10, seed=1)
    os.mkdir(os.fsencode(root) + b"/\xfe")
    bytes_named_png(os.fsencode(root) + b"/\xfe/x.png", seed=3)
    project.params(data={"source": "photos", "per_class": None})

    with pytest.raises(UserError, match=r"class\(es\) \\xfe was rejected"):
        prepare.main()

    assert "UTF-8" in read_rejected()["photos/\\xfe/x.png"]


def test_manifest_write_that_fails_midway_leaves_the_previous_files(project, three_classes):
    """A row that cannot be written (here: a non-UTF-8 label, what crashed prepare before) raises while the
    manifest is half written: the previous manifest stays whole, and no temp file is left."""
    run_prepare(project, source="photos")
    before = {path: path.read_bytes() for path in (MANIFEST, CLASSES, REJECTED, DECODING)}
    good = manifest.read()
    bad = manifest.Row("photos/x.png", "caf\udce9", "train", "0" * 64)

    with pytest.raises(UnicodeEncodeError):
        manifest.write([*good, bad, *good], ["ant", "bee", "cow"], [], "auto")

    assert MANIFEST.read_bytes() == before[MANIFEST]
    assert sorted(p.name for p in MANIFEST.parent.iterdir()) == sorted(
        ["classes.json", "decoding.json", "manifest.csv", "rejected.csv"])


def test_broken_and_looping_links_are_rejected_rows(project):
    root = project.root / "photos"
    plain_class(root / "a", 10, seed=1)
    plain_class(root / "b", 10, seed=2)
    links = {
        root / "a" / "broken.png": ("missing.png", "broken symbolic link"),
        root / "a" / "self.png": ("self.png", "loop"),
        root / "b" / "ping.jpg": ("pong.jpg", "loop"),
        root / "b" / "pong.jpg": ("ping.jpg", "loop"),
        root / "b" / "deeper": (str(project.root / "elsewhere"), "folder"),
        root / "gone": ("no-such-class", "broken symbolic link"),
    }
    (project.root / "elsewhere").mkdir()
    rgb(project.root / "elsewhere" / "x.png", seed=5, size=8)
    for link, (target, _) in links.items():
        link.symlink_to(target)
    linked = root / "a" / "linked.png"
    linked.symlink_to(root / "b" / "img000.png")  # a good link: the same file as its target, a duplicate

    rows = run_prepare(project, source="photos")

    assert len(rows) == 20
    rejected = read_rejected()
    for link, (_, word) in links.items():
        assert word in rejected[rel_link(link)], rejected[rel_link(link)]
    assert len(rejected) == len(links) + 1  # and the good link, a duplicate of its target (named by the target)
    assert metrics()["rejected"] == len(links) and metrics()["duplicates"] == 1


def test_class_folder_with_only_broken_links_fails_naming_them(project):
    root = project.root / "photos"
    plain_class(root / "a", 10, seed=1)
    (root / "b").mkdir()
    (root / "b" / "x.png").symlink_to("nowhere.png")
    project.params(data={"source": "photos", "per_class": None})
    with pytest.raises(UserError, match="symbolic links") as caught:
        prepare.main()
    assert "x.png" in str(caught.value)


def test_csv_that_is_not_utf8_names_the_file(project):
    rgb(project.root / "ds" / "a.png", seed=1, size=8)
    (project.root / "ds" / "list.csv").write_bytes(b"path,label\na.png,caf\xe9\n")
    project.params(data={"source": "ds/list.csv", "per_class": None})
    with pytest.raises(UserError, match="list.csv: not UTF-8"):
        prepare.main()


# ---------------------------------------------------------------- fewer than 2 classes fail here, not later


def test_single_class_dataset_fails_before_any_output(project):
    plain_class(project.root / "photos" / "only", 12, seed=1)
    project.params(data={"source": "photos", "per_class": None})
    with pytest.raises(UserError) as caught:
        prepare.main()
    message = str(caught.value)
    assert "data.source: photos" in message and "(only)" in message and "at least 2" in message
    assert not Path("data/prepared").exists() and not METRICS.exists()


def test_train_split_with_one_class_fails_naming_the_classes(project):
    rows = []
    for i in range(6):
        rgb(project.root / "ds" / f"cat{i}.png", seed=i, size=8)
        rows.append((f"cat{i}.png", "cat", ("train", "val", "test")[i % 3]))
        rgb(project.root / "ds" / f"dog{i}.png", seed=100 + i, size=8)
        rows.append((f"dog{i}.png", "dog", ("val", "test")[i % 2]))
    project.params(data={"source": csv_dataset(project, rows), "per_class": None})
    with pytest.raises(UserError) as caught:
        prepare.main()
    message = str(caught.value)
    assert "data.source: ds/list.csv" in message and "train split (cat)" in message
    assert manifest.read() == []


# ---------------------------------------------------------------- `make run SOURCE=...`'s first step


def test_set_source_writes_an_absolute_path_and_keeps_every_other_line(project):
    from transfer_learning.data.set_source import set_source
    from transfer_learning.params import load_params

    shutil.copy(REPO / "params.yaml", "params.yaml")
    before = Path("params.yaml").read_text().splitlines()
    plain_class(project.root / "my photos" / "a", 2, seed=1)
    plain_class(project.root / "my photos" / "b", 2, seed=2)

    written = set_source("my photos")

    assert written == (project.root / "my photos").resolve().as_posix()
    assert load_params(resolve_backbone=False).data.source == written
    after = Path("params.yaml").read_text().splitlines()
    changed = [(old, new) for old, new in zip(before, after) if old != new]
    assert len(after) == len(before) and len(changed) == 1
    assert changed[0][1].startswith(f"  source: {written} # fashion-mnist | digits")

    with pytest.raises(UserError, match="SOURCE=nowhere: not a folder") as caught:
        set_source("nowhere")
    assert "params.yaml is unchanged" in str(caught.value)
    assert Path("params.yaml").read_text().splitlines() == after

    assert set_source("digits") == "digits" and load_params(resolve_backbone=False).data.source == "digits"
