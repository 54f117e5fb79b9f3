"""Shared fixtures: a temp project folder with a params.yaml, and tiny real image files."""
from __future__ import annotations

import contextlib
import copy
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

pytest_plugins = ["tests.longest_first", "pytester"]
REPO = Path(__file__).resolve().parents[1]
DEFAULT_PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def merged(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class Project:
    """A temp working directory that the stages run in, as DVC runs them from the project root."""

    def __init__(self, root: Path):
        self.root = root

    def params(self, **sections) -> dict:
        params = merged(DEFAULT_PARAMS, sections)
        # libyaml's dumper: the same text as yaml.safe_dump at a quarter of the CPU, for the hundreds of tests here
        (self.root / "params.yaml").write_text(yaml.dump(params, Dumper=yaml.CSafeDumper, sort_keys=False))
        return params


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests are skipped, with the reason, where torch sees no CUDA device."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
        for item in gpu_tests:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def onnxruntime_cuda() -> None:
    """Skips the test unless an ONNX Runtime session really comes up on CUDAExecutionProvider (a GPU alone is not
    enough: onnxruntime-gpu also needs its CUDA and cuDNN libraries)."""
    import onnx
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime build has no CUDAExecutionProvider ({ort.get_available_providers()})")
    tensor = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [tensor],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10)
    ort.preload_dlls()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
    if session.get_providers()[0] != "CUDAExecutionProvider":
        pytest.skip(f"ONNX Runtime does not come up on CUDA here (session providers {session.get_providers()})")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    monkeypatch.chdir(tmp_path)
    project = Project(tmp_path)
    project.params()
    return project


DIGITS_PER_CLASS = 6


def write_digits(folder: Path, per_class: int, start: int = 0) -> None:
    """sklearn's digits as PNG files in <class>/ folders: a user's folder of images."""
    # imported here: every pytest process loads this file, xdist's controller too, which never writes an image
    # (scikit-learn alone costs ~2.5 s CPU)
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(10):
        indices = np.flatnonzero(digits.target == label)[start:start + per_class]
        for i in indices:
            path = folder / str(label) / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((digits.images[i] * 15).astype(np.uint8)).save(path)


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build) -> Path:
    """`build(folder)` run once per test run, not once per xdist worker: the first worker that needs the folder
    builds it under a lock in the folder the workers' temp folders share, the others wait and use it. Tests only
    read it (or copy it, as `workdir` does)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-of-<user>/pytest-<n>/, shared by gw0, gw1, ...
    root, built = base / name, base / f"{name}.built"
    with FileLock(base / f"{name}.lock"):
        if not built.is_file():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            build(root)
            built.touch()
    return root


def build_exported(root: Path) -> None:
    from stages import download, export, prepare

    with contextlib.chdir(root):
        write_digits(root / "images", DIGITS_PER_CLASS)
        Project(root).params(data={"source": "images", "per_class": None, "val_fraction": 0.2, "test_fraction": 0.2},
                             extract={"batch_size": 16, "store": "store"})
        prepare.main()
        download.main()
        export.main()


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> Path:
    """A project with prepared digits (a folder source), MobileNetV2 downloaded and exported, once per test run."""
    return built_once(tmp_path_factory, "exported", build_exported)


@pytest.fixture
def workdir(exported, tmp_path, monkeypatch) -> Path:
    """A private copy of `exported` as the working directory."""
    return work_copy(exported, tmp_path, monkeypatch)


def work_copy(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of a shared build (tests only read those) as the working directory."""
    work = tmp_path / "work"
    shutil.copytree(source, work)
    monkeypatch.chdir(work)
    return work


def keep_first_images(n: int, work: Path = Path(".")) -> None:
    """Only the manifest's first n images (classes 0 and 1, every split for n >= 12): for a test whose point does not
    depend on how many images there are."""
    manifest = work / "data/prepared/manifest.csv"
    rows = manifest.read_text().splitlines()
    manifest.write_text("\n".join(rows[:n + 1]) + "\n")


@pytest.fixture
def mount_small_disk(tmp_path):
    """`mount_small_disk("1M")` -> a folder on a real tmpfs of that size, so that writes fail with the kernel's own
    ENOSPC (mounting needs root, as CI and this machine run tests; skipped where it is refused)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"small-disk-{len(mounted)}"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a {size} tmpfs here: {result.stderr.strip() or result.returncode}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        if subprocess.run(["umount", str(folder)]).returncode != 0:  # a failed test may still hold a file open there
            subprocess.run(["umount", "--lazy", str(folder)], check=True)  # gone once that file is closed
