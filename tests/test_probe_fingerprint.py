"""The fingerprint measures the preprocessing (data/probes.py): it changes when a change of code or library changes
any probe image's pixels (a resampling, the 16-bit rule, a decoder installed or not) and stays when none changes
(a comment-only edit), so stored rows are reused exactly while the current code would compute them again."""
from __future__ import annotations

import io
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import keep_first_images
from transfer_learning.data import decode, probes
from transfer_learning.data.images import Preprocessing
from transfer_learning.features.fingerprint import fingerprint

ROOT = Path(__file__).resolve().parent.parent
PREPROCESSING = Preprocessing(resize=40, crop=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                              interpolation="bilinear")
# a subprocess prints the fingerprint measured(), without importing torch (a data.images.Preprocessing would): the
# fingerprint reads a preprocessing's to_json() and probe_digest(), data/probes.py its fields
FINGERPRINT_SCRIPT = f"""
import types
from transfer_learning.data.probes import probe_digest
from transfer_learning.features.fingerprint import fingerprint
spec = {PREPROCESSING.to_json()!r}
preprocessing = types.SimpleNamespace(**spec, to_json=lambda: spec)
preprocessing.probe_digest = lambda: probe_digest(preprocessing)
print(fingerprint("ab" * 32, preprocessing, "float32"))
"""


def measured() -> str:
    """The fingerprint of one ONNX file under PREPROCESSING, measured afresh (the digest is cached per process)."""
    probes._digest.cache_clear()
    return fingerprint("ab" * 32, PREPROCESSING, "float32")


def measured_in_subprocess(prelude: str = "", root: Path = ROOT) -> str:
    """measured() in a fresh interpreter that runs `prelude` first, with the library at `root`."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(prelude) + FINGERPRINT_SCRIPT], cwd=root,
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(autouse=True)
def fresh_digests():
    probes._digest.cache_clear()
    yield
    probes._digest.cache_clear()


def test_the_probes_cover_every_decoding_path():
    seen = {}
    for path in probes.probe_files():
        data = path.read_bytes()
        image = Image.open(io.BytesIO(data))
        seen[path.name] = (image.format, image.mode, decode.is_deep_colour(image, data))
        decode.decode(data, "auto")  # every probe decodes here
        assert len(data) < (16_000 if "photo" in path.name else 8_000), f"{path.name}: probes stay small"
    kinds = set(seen.values())
    for kind in [("PNG", "L", False), ("PNG", "RGB", False), ("PNG", "RGBA", False), ("PNG", "P", False),
                 ("PNG", "LA", False), ("JPEG", "CMYK", False), ("JPEG", "RGB", False), ("PNG", "I;16", False),
                 ("TIFF", "I;16", False), ("PNG", "RGB", True), ("PNG", "RGBA", True), ("TIFF", "RGB", True),
                 ("TIFF", "I", False), ("TIFF", "F", False), ("BMP", "RGB", False), ("GIF", "P", False),
                 ("WEBP", "RGB", False)]:
        assert kind in kinds, kind
    assert "transparency" in Image.open(probes.PROBES_DIR / "palette_transparency_25x19.png").info
    assert Image.open(probes.PROBES_DIR / "exif_rotated_22x14.jpg").getexif()[0x0112] == 6
    lzw = Image.open(probes.PROBES_DIR / "rgb16_lzw_23x17.tif")
    assert lzw.tag_v2[259] == 5 and lzw.tag_v2[258] == (16, 16, 16)  # LZW, 16-bit colour
    sizes = [Image.open(p).size for p in probes.probe_files()]
    assert (1, 1) in sizes and any(w % 2 and h % 2 for w, h in sizes) and any(w < h for w, h in sizes)
    assert sum(p.stat().st_size for p in probes.probe_files()) < 80_000
    # the usual resizes (256: most weights, 232: ResNet-50 V2): some probes are shrunk, one at 256 is not resampled
    for resize in (256, 232):
        assert sum(min(size) > resize for size in sizes) >= 2, resize
    assert any(min(size) == 256 and size[0] != size[1] for size in sizes)


def test_the_fingerprint_is_the_same_in_every_process_and_for_every_call():
    first = measured()
    assert measured() == first
    assert measured_in_subprocess() == first


def one_grey_level_brighter(resize):
    return lambda self, *args, **kwargs: resize(self, *args, **kwargs).point(lambda value: min(value + 1, 255))


def test_a_resize_one_grey_level_brighter_changes_it():
    before = measured()
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(Image.Image, "resize", one_grey_level_brighter(Image.Image.resize))
        assert measured() != before
    assert measured() == before


IMAGENET = Preprocessing(resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                         interpolation="bilinear")


def one_grey_level_brighter_when_shrinking(resize):
    """A Pillow whose shrinking alone changed (its antialiasing filter path); enlarging gives the same pixels."""
    def patched(self, size, *args, **kwargs):
        resized = resize(self, size, *args, **kwargs)
        shrunk = size[0] < self.width and size[1] < self.height
        return resized.point(lambda value: min(value + 1, 255)) if shrunk else resized
    return patched


def test_a_resize_that_changes_only_shrinking_changes_it():
    """Photos are shrunk to the resize: a probe set whose images were all enlarged (the probes no larger than the
    resize) would have kept its digest under this change and served rows computed by the old Pillow."""
    resized_from = []
    record = Image.Image.resize

    def recording(self, size, *args, **kwargs):
        resized_from.append((self.size, tuple(size)))
        return record(self, size, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(Image.Image, "resize", recording)
        before = probes.probe_digest(IMAGENET)
    assert any(to[0] < source[0] and to[1] < source[1] for source, to in resized_from)
    assert (320, 256) not in [source for source, _ in resized_from]  # short side 256: cropped as decoded
    enlarged_only = [p for p in probes.probe_files() if min(Image.open(p).size) < IMAGENET.resize]
    probes._digest.cache_clear()
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(probes, "probe_files", lambda: enlarged_only)
        enlarged_before = probes.probe_digest(IMAGENET)
        probes._digest.cache_clear()
        patched.setattr(Image.Image, "resize", one_grey_level_brighter_when_shrinking(Image.Image.resize))
        assert probes.probe_digest(IMAGENET) == enlarged_before  # blind to it
    probes._digest.cache_clear()
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(Image.Image, "resize", one_grey_level_brighter_when_shrinking(Image.Image.resize))
        assert probes.probe_digest(IMAGENET) != before
    probes._digest.cache_clear()
    assert probes.probe_digest(IMAGENET) == before


def test_another_16_bit_rule_changes_it():
    before = measured()
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(decode, "white_level", lambda samples, bit_depth: 65535.0)  # the rule before `auto`
        assert measured() != before
    assert measured() == before


def test_another_bit_depth_or_resize_changes_it():
    assert len({fingerprint("ab" * 32, p, "float32") for p in (
        PREPROCESSING, PREPROCESSING.with_bit_depth(12), PREPROCESSING.with_bit_depth(16))}) == 3


def test_a_decoder_missing_or_installed_changes_it():
    """Without tifffile the 16-bit TIFFs are not decodable; with an LZW decoder tifffile reads the LZW probe in full
    instead of PIL's top 8 bits (what installing imagecodecs does: not installed here, its LZW codec is handed to
    tifffile the way imagecodecs provides it)."""
    here = measured_in_subprocess()
    without_tifffile = measured_in_subprocess("import sys; sys.modules['tifffile'] = None\n")
    with_lzw = measured_in_subprocess("""
        import tifffile
        from tests.probe_images import tiff_lzw_decode
        tifffile.TIFF.DECOMPRESSORS._codecs[5] = tiff_lzw_decode
    """)
    assert len({here, without_tifffile, with_lzw}) == 3
    try:
        import imagecodecs  # noqa: F401
    except ImportError:
        return
    without_imagecodecs = measured_in_subprocess("import sys; sys.modules['imagecodecs'] = None\n")
    assert without_imagecodecs != here


def test_the_lzw_decoder_the_test_hands_to_tifffile_reads_what_pil_reads():
    """The stand-in decoder is a real one: tifffile with it gives the samples whose top 8 bits PIL gives."""
    import tifffile

    from tests.probe_images import tiff_lzw_decode

    data = (probes.PROBES_DIR / "rgb16_lzw_23x17.tif").read_bytes()
    tifffile.TIFF.DECOMPRESSORS._codecs[5] = tiff_lzw_decode
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            samples = tiff.pages[0].asarray()
    finally:
        del tifffile.TIFF.DECOMPRESSORS._codecs[5]
    assert samples.dtype == np.uint16 and samples.max() > 255
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), (samples >> 8).astype(np.uint8))


def copy_of_the_library(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "transfer_learning", tmp_path / "transfer_learning",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_a_comment_only_edit_leaves_it_and_a_pixel_edit_changes_it(tmp_path):
    root = copy_of_the_library(tmp_path)
    here = measured_in_subprocess()
    for module in ("data/decode.py", "data/pixels.py"):
        path = root / "transfer_learning" / module
        path.write_text(path.read_text().replace("\n\n\n", "\n\n\n# a comment that changes no pixel\n") + "# end\n")
    assert measured_in_subprocess(root=root) == here
    pixels = root / "transfer_learning" / "data" / "pixels.py"
    source = pixels.read_text()
    assert "int(round((height - crop) / 2.0))" in source
    pixels.write_text(source.replace("int(round((height - crop) / 2.0))", "int((height - crop) // 2)"))
    assert measured_in_subprocess(root=root) != here  # the crop's corner rounded otherwise


def test_extract_recomputes_every_row_after_a_pixel_change_and_none_after_a_change_of_nothing(workdir):
    """End to end: a Pillow whose resize is one grey level brighter recomputes every row (a hand-bumped version
    number recomputed none); back to the real one, every row is reused."""
    import json

    from stages import extract

    def run() -> dict:
        probes._digest.cache_clear()
        extract.main()
        return json.loads(Path("metrics/extract.json").read_text())

    keep_first_images(12)  # every split: how many does not change what is proven
    first = run()
    assert Path.cwd() == workdir and first["computed"] == first["rows"] == 12
    with pytest.MonkeyPatch.context() as patched:  # not the fixture's monkeypatch: its undo would leave `workdir`
        patched.setattr(Image.Image, "resize", one_grey_level_brighter(Image.Image.resize))
        brighter = run()  # the DataLoader's workers are forked from this process: they resize brighter too
    assert brighter["computed"] == first["rows"] and brighter["fingerprint"] != first["fingerprint"]
    again = run()
    assert again["computed"] == 0 and again["reused"] == first["rows"]
    assert again["fingerprint"] == first["fingerprint"]


def test_a_change_of_the_augmentation_changes_the_augmented_views_keys_and_not_the_plain_ones():
    """Augmented rows (extract.augment_views) are keyed by what this process's augmentation makes of the probes
    (features/views.py): torchvision's crop one row lower, or its flip not flipping, changes them; the plain view's
    key and the fingerprint (which measures the plain view) stay."""
    import torch
    from torchvision.transforms import v2

    from transfer_learning.features import views

    def keys() -> tuple:
        views.augment_digest.cache_clear()
        probes._digest.cache_clear()
        return (fingerprint("ab" * 32, IMAGENET, "float32"), views.view_id(0, IMAGENET),
                [views.view_id(view, IMAGENET) for view in (1, 2)])

    crop_params = v2.RandomResizedCrop.make_params

    def one_row_lower(self, flat_inputs):
        params = crop_params(self, flat_inputs)
        return {**params, "top": params["top"] + 1}

    torch.manual_seed(7)
    expected_draw = torch.rand(3)
    torch.manual_seed(7)
    before = keys()
    assert torch.equal(torch.rand(3), expected_draw)  # measuring the augmentation drew nothing from torch's RNG
    assert before[1] == "0" and before[2][0].endswith("-1") and before[2][1].endswith("-2")
    assert keys() == before
    for cls, name, patch in ((v2.RandomResizedCrop, "make_params", one_row_lower),
                             (v2.RandomHorizontalFlip, "transform", lambda self, inpt, params: inpt)):
        with pytest.MonkeyPatch.context() as patched:
            patched.setattr(cls, name, patch)
            fingerprint_after, plain_after, augmented_after = keys()
        assert (fingerprint_after, plain_after) == before[:2], name
        assert all(a != b for a, b in zip(augmented_after, before[2])), name
    assert keys() == before
