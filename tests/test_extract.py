"""extract: real ONNX Runtime over real images into the real HDF5 feature store."""
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from filelock import FileLock
from PIL import Image

from stages import export, extract, prepare
from tests.conftest import DIGITS_PER_CLASS, REPO, keep_first_images, write_digits
from tests.faults import faulty_env
from transfer_learning.backbone import files as backbone_files
from transfer_learning.backbone.anatomy import PooledFeatures
from transfer_learning.common.errors import UserError
from transfer_learning.common.hashing import sha256_file
from transfer_learning.data import manifest
from transfer_learning.features import split_files
from transfer_learning.features.split_files import SplitRows, write_split
from transfer_learning.features.fingerprint import fingerprint
from transfer_learning.features.runtime import CPU, CUDA, FeatureRunner, provider_options, providers_to_try

# CUDA (TF32 off) vs CPU, both fp32: only kernels and summation order differ (typically ~1e-5 of the scale).
# The bound is relative to the largest feature (MobileNetV2's pooled ReLU6 features lie in [0, 6]). That TF32 is
# off is checked on the session's provider options, not inferred from this tolerance.
CUDA_VS_CPU_RTOL_OF_SCALE = 1e-3


def metrics() -> dict:
    return json.loads(Path("metrics/extract.json").read_text())


def read_split(split: str) -> dict:
    with h5py.File(f"data/features/{split}.h5", "r") as handle:
        return {name: handle[name][:] for name in handle} | {"attrs": dict(handle.attrs)}


def set_params(**sections) -> None:
    import yaml

    from tests.conftest import merged
    path = Path("params.yaml")
    path.write_text(yaml.safe_dump(merged(yaml.safe_load(path.read_text()), sections), sort_keys=False))


def feature_atol(provider: str, reference: np.ndarray) -> float:
    """ONNX Runtime vs torch: the export's tolerance on the CPU (export.atol), relative to the features' scale."""
    scale = max(1.0, float(np.abs(reference).max()))
    return 1e-4 * scale if provider == CPU else CUDA_VS_CPU_RTOL_OF_SCALE * scale


def test_features_are_the_torch_backbone_on_the_weights_preprocessing(workdir):
    extract.main()
    m = metrics()
    assert (m["images"], m["computed"], m["reused"]) == (60, 60, 0)
    assert m["feature_dim"] == 1280
    # the default providers [CUDA, CPU]: CUDA wherever torch sees a GPU (or extract fails, see below), else CPU
    assert m["provider"] == (CUDA if torch.cuda.is_available() else CPU)

    test = read_split("test")
    assert test["features"].shape == (len(test["keys"]), 1280)
    assert test["attrs"]["fingerprint"] == m["fingerprint"]
    assert list(test["attrs"]["classes"]) == [str(i) for i in range(10)]
    # the workers' preprocessing + ORT == torchvision's own transforms + the torch model
    backbone = backbone_files.load()
    reference = backbone.model()
    from torchvision.models import MobileNet_V2_Weights
    transforms = MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    module = PooledFeatures(reference, "flatten", "avg")
    images = torch.stack([transforms(Image.open(p.decode() if isinstance(p, bytes) else p).convert("RGB"))
                          for p in test["paths"][:4]])
    with torch.inference_mode():
        expected = module(images).numpy()
    np.testing.assert_allclose(test["features"][:4], expected, rtol=0, atol=feature_atol(m["provider"], expected))

    extract.main()
    assert (metrics()["computed"], metrics()["reused"]) == (0, 60)
    np.testing.assert_array_equal(read_split("test")["features"], test["features"])


def test_extract_rows_are_a_per_image_reference_bit_for_bit(exported, tmp_path, monkeypatch):
    """extract's fast path (grey images resized as one plane, the lookup-table normalize into a reused buffer,
    workers) must not change a single feature value: each image decoded to RGB, resized and normalized on its own
    as extract did before, batched alike, through the same session gives the very same float32 bits. Grey, RGB and palette files in mixed
    batches, one batch short."""
    from transfer_learning.features.extract import compute
    from transfer_learning.features.store import FeatureStore, store_key
    from transfer_learning.features.views import ViewRequest

    monkeypatch.chdir(exported)
    rng = np.random.default_rng(0)
    colour = [tmp_path / "rgb.png", tmp_path / "palette.png"]
    Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(colour[0])
    Image.fromarray(rng.integers(0, 256, (12, 40, 3), dtype=np.uint8)).convert("P").save(colour[1])
    paths = [Path(row.path) for row in manifest.read()[:9]] + colour
    paths.insert(3, paths.pop())  # the palette file mid-batch
    requests = {store_key(sha256_file(p), "0"): ViewRequest(str(p), sha256_file(p), 0) for p in paths}
    backbone = backbone_files.load()
    preprocessing = backbone.preprocessing.with_bit_depth(manifest.read_bit_depth())
    runner = FeatureRunner(backbone_files.ONNX.read_bytes(), [CPU], 4)
    with FeatureStore(tmp_path / "store", "0" * 64, 1280) as store:
        compute(store, requests, runner, preprocessing, 4, workers=1)
        store.commit()
        rows = np.concatenate(list(store.gather(list(requests))))

    pixels = preprocessing.pixels()  # extract's arithmetic before the fast path, one RGB image at a time
    images = torch.cat([preprocessing.normalize(pixels(Image.open(p).convert("RGB"))[None]) for p in paths]).numpy()
    expected = np.concatenate([runner(images[i:i + 4]) for i in range(0, len(images), 4)])
    assert Image.open(paths[0]).mode == "L" and rows.shape == (11, 1280)
    np.testing.assert_array_equal(rows.view(np.uint32), expected.view(np.uint32))


def test_new_images_cost_only_their_own_extraction(workdir):
    extract.main()
    write_digits(workdir / "images", 1, start=DIGITS_PER_CLASS)  # one new image per class
    prepare.main()
    extract.main()
    assert (metrics()["images"], metrics()["computed"], metrics()["reused"]) == (70, 10, 60)

# the extract stage's process, and whether it imported torch by its end
REUSED_RUN = """import runpy, sys
try:
    runpy.run_module("stages.extract", run_name="__main__")
finally:
    print("torch imported:", "torch" in sys.modules)
"""


def test_switching_the_cut_and_back_computes_nothing_the_second_time(workdir):
    keep_first_images(12)
    extract.main()
    penultimate = backbone_files.ONNX.read_bytes()
    set_params(backbone={"cut": 2})  # any other cut: a small one exports in half the CPU of a deep one
    export.main()
    extract.main()
    assert metrics()["computed"] == 12 and metrics()["feature_dim"] == 16
    # back: DVC restores the export it made for these params from its cache rather than exporting again (an export
    # repeated gives the same bytes: tests/test_export.py)
    set_params(backbone={"cut": "penultimate"})
    backbone_files.ONNX.write_bytes(penultimate)
    # as DVC runs it, a process of its own: one that reuses every row imports no torch (seconds of CPU)
    result = subprocess.run([sys.executable, "-c", REUSED_RUN], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert metrics()["computed"] == 0 and metrics()["feature_dim"] == 1280
    assert result.stdout.strip().splitlines()[-1] == "torch imported: False"
    assert len(list(Path("store").iterdir())) == 4  # two fingerprints, each a folder and a lock file


def test_augmented_views_only_for_train_seeded_and_stored(workdir):
    keep_first_images(12)
    set_params(extract={"augment_views": 2})
    extract.main()
    train, val = read_split("train"), read_split("val")
    n_train = int((train["views"] == 0).sum())
    assert len(train["views"]) == 3 * n_train and set(train["views"]) == {0, 1, 2}
    assert set(val["views"]) == {0}
    assert metrics()["computed"] == metrics()["rows"] == 3 * n_train + len(val["views"]) + len(read_split("test")["views"])
    plain, view1 = train["features"][train["views"] == 0], train["features"][train["views"] == 1]
    assert np.abs(plain - view1).max() > 1e-2  # really a different view of the image
    shutil.rmtree("store")  # recompute from scratch: the seeded views come out the same
    extract.main()
    np.testing.assert_allclose(read_split("train")["features"], train["features"], atol=1e-5)
    extract.main()
    assert metrics()["computed"] == 0


def test_an_image_changed_since_prepare_fails_with_its_path_and_keeps_the_rest(workdir):
    set_params(extract={"batch_size": 4, "workers": 0})
    rows = Path("data/prepared/manifest.csv").read_text().splitlines()
    victim = rows[-1].split(",")[0]
    Path(victim).write_bytes(b"not an image any more")
    with pytest.raises(UserError, match=f"{victim}: changed since prepare"):
        extract.main()
    set_params(extract={"batch_size": 4, "workers": 0})
    Path("data/prepared/manifest.csv").write_text("\n".join(rows[:-1]) + "\n")
    extract.main()
    assert metrics()["computed"] == 0 and metrics()["reused"] == 59  # nothing computed before was lost


def test_only_cpu_requested_runs_on_cpu_even_with_a_gpu(workdir, caplog):
    caplog.set_level(logging.INFO)
    set_params(extract={"providers": [CPU]})
    extract.main()
    assert metrics()["provider"] == CPU  # extract.providers is honoured as written
    assert "skipping" not in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="about machines without a CUDA device")
def test_without_a_gpu_cuda_falls_back_to_cpu_with_one_info_line(exported, caplog, capfd):
    caplog.set_level(logging.INFO)
    batch = np.random.default_rng(0).standard_normal((3, 3, 224, 224), dtype=np.float32)
    runner = FeatureRunner(exported / backbone_files.ONNX, [CUDA, CPU], batch_size=16)
    assert runner.provider == runner.session.get_providers()[0] == CPU
    assert [r.levelname for r in caplog.records if "skipping" in r.getMessage()] == ["INFO"]
    assert "CUDAExecutionProvider: no CUDA device" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "CUDAExecutionProvider" not in capfd.readouterr().err  # ORT never tried to load it: no error lines
    np.testing.assert_array_equal(runner(batch), FeatureRunner(exported / backbone_files.ONNX, [CPU], 16)(batch))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where the CUDA provider cannot come up")
def test_cuda_asked_for_with_a_gpu_but_a_session_on_cpu_is_an_error_that_says_the_fix(exported):
    # A real session: this machine's onnxruntime-gpu cannot load its CUDA provider (no driver), which is what a
    # CUDA/cuDNN mismatch looks like on a GPU box; only torch's answer to "is there a GPU" is overridden.
    with pytest.raises(UserError) as error:
        FeatureRunner(exported / backbone_files.ONNX, [CUDA, CPU], batch_size=16, gpu_present=True)
    message = str(error.value)
    assert "extract.providers asks for CUDAExecutionProvider first and torch sees a GPU" in message
    assert "came up on ['CPUExecutionProvider']" in message and "preload_dlls()" in message
    assert "set extract.providers to [CPUExecutionProvider]" in message


def test_providers_are_tried_in_the_order_written_and_cuda_runs_without_tf32(caplog):
    caplog.set_level(logging.INFO)
    assert providers_to_try([CPU, CUDA], gpu_present=True) == [CPU, CUDA]  # CPU first stays first
    assert providers_to_try([CUDA], gpu_present=False) == [CPU]
    assert providers_to_try(["OpenVINOExecutionProvider", CUDA, CPU], gpu_present=True) == [CUDA, CPU]
    assert "OpenVINOExecutionProvider: not in this onnxruntime build" in caplog.text
    assert provider_options(CPU) == (CPU, {})
    name, options = provider_options(CUDA)
    assert name == CUDA and options["use_tf32"] == "0"  # CUDA rows stay fp32: one store key with CPU rows


@pytest.mark.gpu
def test_cuda_extraction_equals_cpu_and_shares_its_rows(workdir, onnxruntime_cuda):
    runner = FeatureRunner(backbone_files.ONNX, [CUDA, CPU], batch_size=16)
    assert runner.session.get_provider_options()[CUDA]["use_tf32"] == "0"
    extract.main()  # the default providers
    assert metrics()["provider"] == CUDA
    on_cuda = {split: read_split(split) for split in ("train", "val", "test")}

    set_params(extract={"providers": [CPU], "store": "store-cpu"})
    extract.main()
    assert metrics()["provider"] == CPU and metrics()["computed"] == 60
    for split, cuda_rows in on_cuda.items():
        cpu_rows = read_split(split)
        np.testing.assert_array_equal(cpu_rows["keys"], cuda_rows["keys"])
        np.testing.assert_allclose(cuda_rows["features"], cpu_rows["features"], rtol=0,
                                   atol=CUDA_VS_CPU_RTOL_OF_SCALE * np.abs(cpu_rows["features"]).max())

    set_params(extract={"store": "store"})  # CPU on the store CUDA filled: the same key, nothing to compute
    extract.main()
    assert (metrics()["computed"], metrics()["reused"]) == (0, 60)


def run_extract(cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = env or {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "stages.extract"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_features(exported, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(exported, work)
    keep_first_images(40, work)
    store = work / "store"
    # 40 images in batches of 16, a commit every 16 rows: SIGKILLed right after the 2nd commit, mid-run
    process = run_extract(work, faulty_env(tmp_path / "faults", commit_rows=16, kill_after_commits=2))
    out, _ = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, out
    committed = sum(h5py.File(f, "r").attrs["rows"] for f in store.glob("*/*.h5"))
    total = len((work / "data/prepared/manifest.csv").read_text().splitlines()) - 1
    assert 0 < committed < total, "the kill should land mid-run"

    with contextlib.chdir(work):
        extract.main()  # resumes
    m = json.loads((work / "metrics/extract.json").read_text())
    assert m["reused"] == committed and m["computed"] == total - committed

    clean = tmp_path / "clean"
    shutil.copytree(exported, clean)
    keep_first_images(40, clean)
    with contextlib.chdir(clean):
        extract.main()  # uninterrupted
    for split in ("train", "val", "test"):
        with h5py.File(work / f"data/features/{split}.h5") as a, h5py.File(clean / f"data/features/{split}.h5") as b:
            np.testing.assert_array_equal(a["keys"][:], b["keys"][:])
            np.testing.assert_allclose(a["features"][:], b["features"][:], atol=1e-6)


@pytest.mark.slow
def test_two_extracts_on_one_store_at_once(exported, tmp_path):
    shared_store = tmp_path / "shared-store"
    works = []
    for name in ("a", "b"):
        work = tmp_path / name
        shutil.copytree(exported, work)
        text = (work / "params.yaml").read_text().replace("store: store", f"store: {shared_store}")
        (work / "params.yaml").write_text(text)
        keep_first_images(12, work)
        works.append(work)
    total = len((works[0] / "data/prepared/manifest.csv").read_text().splitlines()) - 1
    os.chdir(works[0])
    try:
        preprocessing = backbone_files.load().preprocessing.with_bit_depth(manifest.read_bit_depth())
        features_fp = fingerprint(sha256_file(backbone_files.ONNX), preprocessing, "float32")
    finally:
        os.chdir(REPO)
    # the test holds the store's lock while both start, so both must wait, whatever the timing; then one
    # computes everything and the other, waiting for it, reuses everything
    held = FileLock(str(shared_store / features_fp) + ".lock")
    shared_store.mkdir()
    with held:
        processes = [run_extract(w) for w in works]
        seen = [[], []]
        for process, lines in zip(processes, seen):
            while not any("in use by another process; waiting" in line for line in lines):
                line = process.stdout.readline()
                assert line, "extract ended without waiting for the lock:\n" + "".join(lines)
                lines.append(line)
    outputs = ["".join(lines) + p.communicate(timeout=300)[0] for p, lines in zip(processes, seen)]
    assert [p.returncode for p in processes] == [0, 0], outputs
    results = [json.loads((w / "metrics/extract.json").read_text()) for w in works]
    assert sorted(r["computed"] for r in results) == [0, total]  # the second waited, then reused everything
    for split in ("train", "val", "test"):
        with h5py.File(works[0] / f"data/features/{split}.h5") as a, h5py.File(works[1] / f"data/features/{split}.h5") as b:
            np.testing.assert_array_equal(a["features"][:], b["features"][:])


def write_small_split(path: Path, features: np.ndarray) -> None:
    n = len(features)
    rows = SplitRows(keys=[f"{i:064x}" for i in range(n)], paths=[f"images/{i}.png" for i in range(n)],
                     labels=[i % 3 for i in range(n)], views=[0] * n)
    write_split(path, rows, iter([features[: n // 2], features[n // 2:]]), fingerprint="f" * 64,
                classes=["a", "b", "c"], feature_dim=features.shape[1], dtype="float32")


def test_a_split_file_with_a_flipped_byte_or_cut_short_is_refused_naming_it(tmp_path):
    features = np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32)
    write_small_split(tmp_path / "train.h5", features)
    np.testing.assert_array_equal(split_files.read_split("train", tmp_path).features, features)
    good = (tmp_path / "train.h5").read_bytes()

    with h5py.File(tmp_path / "train.h5", "r") as handle:
        offset = handle["features"].id.get_offset()  # where the features' bytes sit in the file
    flipped = bytearray(good)
    flipped[offset + 200] ^= 0x01  # one mantissa bit: a finite value, slightly off
    (tmp_path / "train.h5").write_bytes(bytes(flipped))
    for read in (split_files.read_split, split_files.read_labels, split_files.read_plain_keys):
        with pytest.raises(UserError, match=r"train.h5 does not match the sha256 recorded when it was written "
                                            r"\(features\): .*`dvc checkout data/features`.*`dvc repro extract`"):
            read("train", tmp_path)

    for cut in (len(good) // 2, len(good) - 64):
        (tmp_path / "train.h5").write_bytes(good[:cut])
        with pytest.raises(UserError, match=r"train.h5 cannot be (opened|read).*truncated.*`dvc repro extract`"):
            split_files.read_split("train", tmp_path)


def test_a_split_file_with_non_finite_features_or_no_digests_is_refused(tmp_path):
    features = np.ones((6, 4), np.float32)
    features[2, 1] = np.nan
    write_small_split(tmp_path / "val.h5", features)
    with pytest.raises(UserError, match=r"val.h5 holds values that are not finite"):
        split_files.read_split("val", tmp_path)

    write_small_split(tmp_path / "test.h5", np.ones((6, 4), np.float32))
    with h5py.File(tmp_path / "test.h5", "r+") as handle:  # as an extract before the digests wrote it
        for name in split_files.DIGESTED:
            del handle.attrs[f"{name}_sha256"]
    with pytest.raises(UserError, match=r"test.h5 was written by an older extract.*`dvc repro extract -f`"):
        split_files.read_split("test", tmp_path)


def test_backbone_weights_with_a_flipped_byte_are_refused(workdir):
    import zipfile

    backbone = backbone_files.load()
    with zipfile.ZipFile(backbone_files.WEIGHTS) as archive:  # tensors are stored uncompressed
        entry = max((e for e in archive.infolist() if "/data/" in e.filename), key=lambda e: e.file_size)
        payload = archive.read(entry)
    data = bytearray(backbone_files.WEIGHTS.read_bytes())
    data[data.find(payload) + len(payload) // 2] ^= 0x01  # one bit of the largest tensor
    backbone_files.WEIGHTS.write_bytes(bytes(data))
    torch.load(backbone_files.WEIGHTS, weights_only=True)  # still loads: only the digest tells
    with pytest.raises(UserError, match=r"models/backbone/weights.pt does not match the sha256 in "
                                        r"models/backbone/meta.json.*`dvc checkout models/backbone`.*"
                                        r"`dvc repro download`"):
        backbone.model()
