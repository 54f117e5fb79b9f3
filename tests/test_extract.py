"""extract: real ONNX Runtime over real images into the real HDF5 feature store."""
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from stages import export, extract, prepare
from stages.core import backbone_files
from stages.core.backbones import PooledFeatures
from stages.core.errors import UserError
from tests.conftest import DIGITS_PER_CLASS, REPO, write_digits


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


def test_features_are_the_torch_backbone_on_the_weights_preprocessing(workdir, caplog):
    caplog.set_level(logging.INFO)
    extract.main()
    m = metrics()
    assert (m["images"], m["computed"], m["reused"]) == (60, 60, 0)
    assert m["provider"] == "CPUExecutionProvider" and m["feature_dim"] == 1280
    assert "CUDAExecutionProvider'] requested but not usable" in caplog.text  # the one fallback line

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
        np.testing.assert_allclose(test["features"][:4], module(images).numpy(), atol=1e-4)

    extract.main()
    assert (metrics()["computed"], metrics()["reused"]) == (0, 60)
    np.testing.assert_array_equal(read_split("test")["features"], test["features"])


def test_new_images_cost_only_their_own_extraction(workdir):
    extract.main()
    write_digits(workdir / "images", 1, start=DIGITS_PER_CLASS)  # one new image per class
    prepare.main()
    extract.main()
    assert (metrics()["images"], metrics()["computed"], metrics()["reused"]) == (70, 10, 60)


def test_switching_the_cut_and_back_computes_nothing_the_second_time(workdir):
    extract.main()
    set_params(backbone={"cut": 10})
    export.main()
    extract.main()
    assert metrics()["computed"] == 60 and metrics()["feature_dim"] == 64
    set_params(backbone={"cut": "penultimate"})
    export.main()
    extract.main()
    assert metrics()["computed"] == 0 and metrics()["feature_dim"] == 1280
    assert len(list(Path("store").iterdir())) == 4  # two fingerprints, each a folder and a lock file


def test_augmented_views_only_for_train_seeded_and_stored(workdir):
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


def test_only_cpu_requested(workdir, caplog):
    caplog.set_level(logging.INFO)
    set_params(extract={"providers": ["CPUExecutionProvider"]})
    extract.main()
    assert metrics()["provider"] == "CPUExecutionProvider"
    assert "requested but not usable" not in caplog.text


def run_extract(cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "stages.extract"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_features(exported, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(exported, work)
    write_digits(work / "images", 200, start=DIGITS_PER_CLASS)  # all of digits: several commits' worth
    os.chdir(work)
    try:
        prepare.main()
    finally:
        os.chdir(REPO)
    store = work / "store"
    process = run_extract(work)
    deadline = time.monotonic() + 120
    while not list(store.glob("*/segment-*.h5")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(random.uniform(0, 1.5))
    process.send_signal(signal.SIGKILL)
    process.wait()
    committed = sum(h5py.File(f, "r").attrs["rows"] for f in store.glob("*/*.h5"))
    total = len((work / "data/prepared/manifest.csv").read_text().splitlines()) - 1
    assert 0 < committed < total, "the kill should land mid-run"

    resumed = run_extract(work)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    m = json.loads((work / "metrics/extract.json").read_text())
    assert m["reused"] >= committed and m["computed"] == total - m["reused"]

    clean = tmp_path / "clean"
    shutil.copytree(work, clean, ignore=shutil.ignore_patterns("store", "features"))
    fresh = run_extract(clean)
    out, _ = fresh.communicate(timeout=300)
    assert fresh.returncode == 0, out
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
        write_digits(work / "images", 200, start=DIGITS_PER_CLASS)  # long enough that the runs overlap
        os.chdir(work)
        try:
            prepare.main()
        finally:
            os.chdir(REPO)
        works.append(work)
    total = len((works[0] / "data/prepared/manifest.csv").read_text().splitlines()) - 1
    processes = [run_extract(w) for w in works]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    results = [json.loads((w / "metrics/extract.json").read_text()) for w in works]
    assert sorted(r["computed"] for r in results) == [0, total]  # the second waited, then reused everything
    assert any("in use by another process; waiting" in out for out in outputs)
    for split in ("train", "val", "test"):
        with h5py.File(works[0] / f"data/features/{split}.h5") as a, h5py.File(works[1] / f"data/features/{split}.h5") as b:
            np.testing.assert_array_equal(a["features"][:], b["features"][:])
