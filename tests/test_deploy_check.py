"""The deployed file's preprocessing is checked against the evaluation preprocessing (data/pixels.py) on the probe
images when it is written: its normalization within one grey level, its class on every probe predict's. Real
models (test_predict's project: a logistic head and the fine-tuned model), real ONNX Runtime."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest

from tests.test_finetune import finetuned, heads_trained  # noqa: F401 - fixtures, shared builds
from tests.test_predict import every_model, every_model_work, here  # noqa: F401 - fixtures, shared builds
from transfer_learning.backbone import files as backbone_files
from transfer_learning.backbone.onnx_export import cpu_session
from transfer_learning.common.errors import UserError
from transfer_learning.data import manifest
from transfer_learning.deploy import onnx as deploy_onnx
from transfer_learning.deploy import predict
from transfer_learning.deploy.onnx import CHECK, PIXELS, PROBABILITIES
from transfer_learning.heads import files as head_files

CPU = ["CPUExecutionProvider"]


def preprocessing():
    return backbone_files.load().preprocessing.with_bit_depth(manifest.read_bit_depth())


def two_step(name: str):
    """What predict serves for head `name`: uint8 pixels -> scores."""
    head = head_files.load(name)
    served = predict.TwoStepPredictor(head, predict.check_features_match(head, backbone_files.load()), 32, CPU)
    return lambda pixels: served(pixels, preprocessing())


@pytest.mark.parametrize("model", ["logreg", "finetune"])
def test_a_deployed_file_serves_predicts_class_on_every_probe_image(every_model_work, model):
    path = predict.deploy(model)
    written = onnx.load(str(path))
    figures = json.loads({p.key: p.value for p in written.metadata_props}[CHECK])
    names, pixels = deploy_onnx.probe_pixels(preprocessing())
    assert figures["probe_images"] == len(names) >= 20 and figures["same_class"] == len(names)
    assert figures["max_normalization_difference_grey_levels"] <= 0.01  # the same float32 arithmetic
    # the written file itself, run again: predict's class on every probe (ties within float rounding aside)
    got = cpu_session(path).run([PROBABILITIES], {PIXELS: pixels})[0]
    if model == "finetune":
        served = predict.FineTunedPredictor(32, CPU, preprocessing())(pixels, preprocessing())
    else:
        served = two_step(model)(pixels)
    np.testing.assert_allclose(got, served, atol=1e-4)


def test_a_file_normalizing_more_than_one_grey_level_otherwise_is_refused(here):
    head = head_files.load("logreg")
    backbone_onnx = predict.check_features_match(head, backbone_files.load())
    right = preprocessing()
    for shift, refused in ((0.01, False), (2.0, True)):  # the mean moved by `shift` grey levels
        moved = replace(right, mean=tuple(m + shift / 255 for m in right.mean))
        built = deploy_onnx.build(backbone_onnx, head, moved)
        if refused:
            with pytest.raises(UserError, match=r"normalization differs from the pipeline's by 2 grey levels"):
                deploy_onnx.check_preprocessing(built, right, two_step("logreg"))
        else:
            figures = deploy_onnx.check_preprocessing(built, right, two_step("logreg"))
            assert 0.005 < figures["max_normalization_difference_grey_levels"] <= 0.011


def test_a_file_giving_other_classes_than_predict_is_refused(here):
    head = head_files.load("logreg")
    built = deploy_onnx.build(predict.check_features_match(head, backbone_files.load()), head, preprocessing())
    served = two_step("logreg")
    with pytest.raises(UserError, match="class index .* predict gives"):  # predict's scores, classes shifted by one
        deploy_onnx.check_preprocessing(built, preprocessing(), lambda pixels: np.roll(served(pixels), 1, axis=1))
