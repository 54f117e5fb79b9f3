"""Backbone anatomy (blocks, penultimate node, cuts) and the preprocessing, on real torchvision models."""
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from torchvision.models import MobileNet_V2_Weights, get_model

from transfer_learning.backbone.anatomy import PooledFeatures, anatomy
from transfer_learning.common.errors import UserError
from transfer_learning.data.images import Preprocessing


@pytest.fixture(scope="module")
def mobilenet():
    return get_model("mobilenet_v2").eval()


def test_mobilenet_blocks_are_its_feature_stages(mobilenet):
    parts = anatomy(mobilenet)
    assert [b.name for b in parts.blocks] == [f"features.{i}" for i in range(19)]
    assert parts.classifier == "classifier"
    assert parts.penultimate_node == "flatten"
    assert parts.blocks[-1].output_node == "features.18"


def test_resnet_blocks_keep_its_stages_whole():
    parts = anatomy(get_model("resnet18").eval())
    assert [b.name for b in parts.blocks] == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    assert parts.blocks[1].output_node == "maxpool"  # parameter-free ops after a block belong to it
    assert parts.classifier == "fc"


def test_cut_values_resolve_to_nodes(mobilenet):
    parts = anatomy(mobilenet)
    assert parts.cut_node("penultimate") == "flatten"
    assert parts.cut_node(3) == parts.blocks[2].output_node
    assert parts.cut_node("features.10.add") == "features.10.add"
    with pytest.raises(UserError, match=r"backbone.cut=20.*valid: 1..19"):
        parts.cut_node(20)
    with pytest.raises(UserError, match=r"backbone.cut='features.99'.*not a graph node"):
        parts.cut_node("features.99")


@pytest.mark.parametrize("pool, shape", [("avg", (2, 32)), ("max", (2, 32)), ("none", (2, 32 * 8 * 8))])
def test_pooling_of_a_feature_map(mobilenet, pool, shape):
    parts = anatomy(mobilenet)
    features = PooledFeatures(mobilenet, parts.cut_node(5), pool)(torch.randn(2, 3, 64, 64))
    assert tuple(features.shape) == shape


def test_preprocessing_matches_the_weights_own_transforms():
    reference = MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    ours = Preprocessing.from_weights_transforms(reference)
    assert (ours.resize, ours.crop) == (256, 224)
    for photo in (skdata.chelsea(), skdata.coffee(), np.zeros((28, 28, 3), np.uint8)):
        image = Image.fromarray(photo)
        assert torch.allclose(ours.transform()(image), reference(image), atol=1e-6)
    assert Preprocessing.from_json(ours.to_json()) == ours


def test_worker_pixels_plus_batch_normalize_equal_the_weights_transforms():
    reference = MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    ours = Preprocessing.from_weights_transforms(reference)
    photos = [Image.fromarray(p) for p in (skdata.chelsea(), skdata.coffee())]
    batch = ours.normalize(torch.stack([ours.pixels()(p) for p in photos]))
    assert batch.dtype == torch.float32
    assert torch.allclose(batch, torch.stack([reference(p) for p in photos]), atol=1e-6)
