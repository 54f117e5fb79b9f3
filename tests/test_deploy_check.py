"""The deployed file's preprocessing is checked against the evaluation preprocessing (data/pixels.py) on the probe
images when it is written: its normalization within one grey level, its class on every probe predict's. Real
models (test_predict's project), real ONNX Runtime. That a written file carries these figures and serves predict's
probabilities on the probes (a logistic head's and the fine-tuned model's) is asserted where test_predict deploys
them, in its fp32 agreement test (assert_serves_predicts_class_on_every_probe_image); here, the refusals."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tests.test_finetune import finetuned, heads_trained  # noqa: F401 - fixtures, shared builds
from tests.test_predict import every_model, here  # noqa: F401 - fixtures, shared builds
from tests.test_predict import preprocessing, two_step
from transfer_learning.backbone import files as backbone_files
from transfer_learning.common.errors import UserError
from transfer_learning.deploy import onnx as deploy_onnx
from transfer_learning.deploy import predict
from transfer_learning.heads import files as head_files


def test_a_file_normalizing_more_than_one_grey_level_otherwise_is_refused(here):
    head = head_files.load("logreg")
    backbone_onnx = predict.check_features_match(head, backbone_files.load())
    right, served = preprocessing(), two_step("logreg")
    for shift, refused in ((0.01, False), (2.0, True)):  # the mean moved by `shift` grey levels
        moved = replace(right, mean=tuple(m + shift / 255 for m in right.mean))
        built = deploy_onnx.build(backbone_onnx, head, moved)
        if refused:
            with pytest.raises(UserError, match=r"normalization differs from the pipeline's by 2 grey levels"):
                deploy_onnx.check_preprocessing(built, right, served)
        else:
            figures = deploy_onnx.check_preprocessing(built, right, served)
            assert 0.005 < figures["max_normalization_difference_grey_levels"] <= 0.011


def test_a_file_giving_other_classes_than_predict_is_refused(here):
    head = head_files.load("logreg")
    built = deploy_onnx.build(predict.check_features_match(head, backbone_files.load()), head, preprocessing())
    served = two_step("logreg")
    with pytest.raises(UserError, match="class index .* predict gives"):  # predict's scores, classes shifted by one
        deploy_onnx.check_preprocessing(built, preprocessing(), lambda pixels: np.roll(served(pixels), 1, axis=1))
