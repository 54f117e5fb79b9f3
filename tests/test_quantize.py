"""extract.precision: int8 (ORT static quantization, cached and verified) and fp16 (CUDA), with real ORT, HDF5 and
images (the digits project of `exported`, MobileNetV2)."""
import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from stages import extract
from tests.conftest import built_once, work_copy
from tests.test_extract import metrics, set_params
from tests.test_finetune import heads_trained  # noqa: F401 - fixture, a shared build
from transfer_learning.common.errors import UserError
from transfer_learning.features import quantize
from transfer_learning.features.split_files import read_split
from transfer_learning.params import load_params

INT8 = {"precision": "int8", "calibration_images": 6}
CALIBRATED, REUSED = "int8 model: calibrated", "int8 model: reused"


EXTRACT_LOG = "int8-extract.log"  # the build's extract log, kept beside the project for the test that reads it


@pytest.fixture(scope="module")
def int8_calibrated(heads_trained, tmp_path_factory) -> Path:
    """test_finetune's `heads_trained` (fp32 rows extracted; its heads play no part here) with its features
    extracted again at int8, built once per run: the int8 model calibrated from scratch into store/quantized, its
    rows beside the fp32 ones, that extract's log in EXTRACT_LOG. The int8 rows test reads that first int8 run,
    test_predict's int8 project serves this model."""
    def build(root: Path) -> None:
        shutil.copytree(heads_trained, root, dirs_exist_ok=True)
        handler, logger = logging.FileHandler(root / EXTRACT_LOG), logging.getLogger()
        level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            with contextlib.chdir(root):
                set_params(extract=INT8)
                extract.main()
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
            handler.close()

    return built_once(tmp_path_factory, "int8-calibrated", build)


@pytest.fixture
def int8_workdir(int8_calibrated, tmp_path, monkeypatch) -> Path:
    return work_copy(int8_calibrated, tmp_path, monkeypatch)


def features_and_labels() -> dict:
    return {split: (read_split(split).features, read_split(split).labels) for split in ("train", "val", "test")}


def held_out_accuracy(splits: dict) -> float:
    """A logistic head fitted on train, scored on val + test (24 images)."""
    (x, y), held = splits["train"], [splits["val"], splits["test"]]
    head = LogisticRegression(C=1.0, max_iter=2000).fit(x, y)
    return float(np.mean(np.concatenate([head.predict(f) == labels for f, labels in held])))


def test_int8_rows_differ_from_fp32_but_a_logistic_head_lands_close(int8_workdir, heads_trained):
    # the project's first int8 extract (`int8_calibrated`'s build), after its fp32 one (`heads_trained`'s)
    fp32_fingerprint = json.loads((heads_trained / "metrics/extract.json").read_text())["fingerprint"]
    assert CALIBRATED in Path(EXTRACT_LOG).read_text() and REUSED not in Path(EXTRACT_LOG).read_text()
    metrics_int8 = metrics()
    assert metrics_int8["precision"] == "int8" and metrics_int8["computed"] == 60  # its own store folder
    assert metrics_int8["fingerprint"] != fp32_fingerprint
    int8 = features_and_labels()

    set_params(extract={"precision": "fp32"})
    extract.main()
    assert metrics()["computed"] == 0 and metrics()["fingerprint"] == fp32_fingerprint
    assert metrics()["precision"] == "fp32"
    fp32 = features_and_labels()
    a, b = fp32["test"][0], int8["test"][0]
    assert not np.allclose(a, b, atol=1e-3)
    cosine = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.8
    # 24 held-out images: a head on int8 rows may miss at most 2 more than the one on fp32 rows
    assert held_out_accuracy(int8) >= held_out_accuracy(fp32) - 2 / 24
    assert_kept_layers_are_float(Path("store", quantize.QUANTIZED_DIR, metrics_int8["quantized_model"]))


def assert_kept_layers_are_float(model_file: Path) -> None:
    """INT8_OPTIONS' fp32_first_convs and fp32_from_last_convs: a kept conv reads float weights (an initializer),
    every other conv reads int8 weights through DequantizeLinear."""
    import onnx

    model = onnx.load(model_file)
    made_by = {output: node.op_type for node in model.graph.node for output in node.output}
    weights = [made_by.get(node.input[1], "initializer") for node in model.graph.node if node.op_type == "Conv"]
    first, last = quantize.INT8_OPTIONS["fp32_first_convs"], quantize.INT8_OPTIONS.get("fp32_from_last_convs", 0)
    assert weights[:first] + weights[len(weights) - last:] == ["initializer"] * (first + last)
    assert set(weights[first:len(weights) - last]) == {"DequantizeLinear"}


def test_the_quantized_model_is_reused_and_a_damaged_one_is_moved_aside_and_rebuilt(int8_workdir, caplog):
    first = metrics()["fingerprint"]  # `int8_calibrated`'s extract, which calibrated
    set_params(extract=INT8)
    with caplog.at_level(logging.INFO):
        extract.main()
    assert REUSED in caplog.text and CALIBRATED not in caplog.text  # no second calibration
    assert metrics()["computed"] == 0 and metrics()["fingerprint"] == first

    [cached] = Path("store", quantize.QUANTIZED_DIR).glob("*.onnx")
    assert metrics()["quantized_model"] == cached.name  # what `stages.store gc` keeps it by
    month_ago = time.time() - 30 * 86400
    os.utime(cached, (month_ago, month_ago))
    extract.main()
    assert cached.stat().st_mtime > month_ago + 29 * 86400  # a reuse is a use (gc's --days)
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0x01  # a flipped bit in the middle of the weights
    cached.write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        extract.main()
    assert "moved aside" in caplog.text and CALIBRATED in caplog.text
    assert len(list(cached.parent.glob("*.onnx.rejected-*"))) == 1
    assert quantize.reusable(cached) is not None  # the rebuilt file matches its recorded sha256
    # same calibration, same bytes: the rows computed before are still served
    assert metrics()["fingerprint"] == first and metrics()["computed"] == 0


def test_a_bad_precision_names_extract_precision_and_the_choices(project):
    project.params(extract={"precision": "int4"})
    with pytest.raises(UserError, match=r"extract\.precision[\s\S]*fp32[\s\S]*int8"):
        load_params(resolve_estimators=False, resolve_backbone=False)


def test_fp16_on_the_cpu_provider_is_refused_with_the_choices_for_this_machine(workdir):
    set_params(extract={"precision": "fp16", "providers": ["CPUExecutionProvider"]})
    with pytest.raises(UserError, match=r"extract\.precision: fp16 needs the CUDA provider.*valid choices on this "
                                        r"machine: fp32, int8"):
        extract.main()
    assert not Path("metrics/extract.json").exists()


@pytest.mark.gpu
def test_fp16_on_cuda_gives_rows_close_to_fp32(workdir, onnxruntime_cuda):
    set_params(extract={"providers": ["CUDAExecutionProvider"]})
    extract.main()
    fp32 = read_split("test").features
    set_params(extract={"precision": "fp16", "providers": ["CUDAExecutionProvider"]})
    extract.main()
    assert metrics()["precision"] == "fp16" and metrics()["computed"] == 60
    fp16 = read_split("test").features
    np.testing.assert_allclose(fp16, fp32, atol=2e-2 * float(np.abs(fp32).max()))
