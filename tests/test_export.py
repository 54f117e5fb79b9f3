"""export: cut + pool + ONNX with a dynamic batch, parity-checked with ONNX Runtime, for three architectures."""
import contextlib
import json

import numpy as np
import pytest
import torch

from stages import download, export
from transfer_learning.backbone import files as backbone_files
from transfer_learning.backbone import onnx_export
from transfer_learning.backbone.anatomy import PooledFeatures
from transfer_learning.common.errors import UserError

CASES = {
    # arch: (weights, the exported cut (node, pool, feature_dim), the block cut resolved (block, its node, pool,
    # feature_dim)). The export traces every node before the cut, so the exported node cuts sit early in the
    # network: what they prove (the cut resolved, pooled, exported with a dynamic batch, equal to torch) does not
    # depend on depth. With the default backbone's penultimate export (the `exported` fixture's, tests/conftest.py,
    # checked below) they export every ONNX op type of the three whole networks, the head's global pooling and
    # flatten included, and each of the three pools. A block number reaches the export as a node the anatomy
    # resolves, the same code path as a node name: each block cut's and penultimate cut's node and feature_dim are
    # checked without an export (test_layers exports block cuts through the stage and compares their rows).
    "mobilenet_v2": ("IMAGENET1K_V1", ("features.3.add", "avg", 24), (2, "features.1.conv.2", "max", 16)),
    "resnet18": ("none", ("layer1.0.relu_1", "none", 64 * 56 * 56), (3, "layer1.1.relu_1", "max", 64)),
    "efficientnet_b0": ("none", ("features.1.0.block.1", "max", 32), (3, "features.2.1.add", "avg", 24)),
}
# arch: (the graph node `backbone.cut: penultimate` names, the feature_dim it gives with `pool: avg`)
PENULTIMATE = {"mobilenet_v2": ("flatten", 1280), "resnet18": ("flatten", 512), "efficientnet_b0": ("flatten", 1280)}


def check_onnx_against_torch(batch_sizes=(1, 3)):
    """ORT output == torch output at batch sizes other than the ones the stage used."""
    params = json.loads(open("metrics/export.json").read())
    backbone = backbone_files.load()
    module = PooledFeatures(backbone.model(), params["cut_node"], params["pool"])
    session = onnx_export.cpu_session(backbone_files.ONNX)
    assert session.get_inputs()[0].shape[0] == "batch"
    for n in batch_sizes:
        batch = torch.randn(n, 3, 224, 224)
        got = session.run(None, {onnx_export.INPUT: batch.numpy()})[0]
        with torch.inference_mode():
            np.testing.assert_allclose(got, module(batch).numpy(), atol=1e-4)
        assert got.shape == (n, params["feature_dim"])


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(CASES))
def test_export_cuts(project, arch):
    weights, (node, pool, dim), (block, block_node, block_pool, block_dim) = CASES[arch]
    project.params(backbone={"arch": arch, "weights": weights})
    download.main()
    check_resolved("penultimate", *PENULTIMATE[arch], "avg")
    check_resolved(block, block_node, block_dim, block_pool)
    project.params(backbone={"arch": arch, "weights": weights, "cut": node, "pool": pool})
    export.main()
    check_export(dim)


def check_resolved(cut: int | str, node: str, dim: int, pool: str) -> None:
    """The node and feature_dim the export stage would resolve and compute for `cut` and `pool`, from the
    downloaded backbone's anatomy and its torch forward pass: no export (the exported cuts above and the
    `exported` fixture export the whole networks' ops)."""
    backbone = backbone_files.load()
    assert backbone.anatomy.cut_node(cut) == node
    module = PooledFeatures(backbone.model(), node, pool).eval()
    with torch.inference_mode():
        assert module(torch.rand(2, 3, 224, 224)).shape == (2, dim)


def check_export(dim: int) -> None:
    metrics = json.loads(open("metrics/export.json").read())
    assert metrics["feature_dim"] == dim
    assert metrics["max_abs_diff"] <= metrics["atol"]
    assert metrics["parity_batch_sizes"] == [2, 5]
    check_onnx_against_torch()


def test_the_default_backbone_exported_at_its_penultimate_cut(exported, monkeypatch):
    monkeypatch.chdir(exported)  # read only: the stage's export that the other tests start from
    metrics = json.loads(open("metrics/export.json").read())
    assert (metrics["arch"], metrics["weights"], metrics["cut"], metrics["pool"]) == \
        ("mobilenet_v2", "IMAGENET1K_V1", "penultimate", "avg")
    check_export(1280)


def test_in_place_activations_switched_off_for_the_export_give_the_same_bytes_and_are_switched_back(tmp_path,
                                                                                                      monkeypatch):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU6(inplace=True),
                              torch.nn.Conv2d(4, 4, 1), torch.nn.SiLU(inplace=True)).eval()
    net[3].weight.requires_grad_(False)  # parameters are traced without grad: a frozen one stays frozen
    example = torch.rand(2, 3, 8, 8)
    onnx_export.export(net, example, tmp_path / "switched.onnx", opset=18)
    assert [layer.inplace for layer in net if hasattr(layer, "inplace")] == [True, True]  # the caller's net
    assert [p.requires_grad for p in net.parameters()] == [True, True, True, True, False, True]
    assert torch.is_grad_enabled()
    with monkeypatch.context() as patch:
        patch.setattr(onnx_export, "out_of_place", lambda module: contextlib.nullcontext())
        patch.setattr(onnx_export, "without_grad", lambda module: contextlib.nullcontext())
        onnx_export.export(net, example, tmp_path / "as_is.onnx", opset=18)  # in-place ops and autograd as they are
    assert (tmp_path / "switched.onnx").read_bytes() == (tmp_path / "as_is.onnx").read_bytes()


def test_parity_above_atol_fails_with_the_numbers_and_a_repeated_export_gives_the_same_bytes(project):
    project.params(backbone={"cut": 2}, export={"atol": 1e-12})
    download.main()
    with pytest.raises(UserError, match=r"export.atol: ONNX Runtime differs from torch by .* > atol 1e-12"):
        export.main()
    assert json.loads(open("metrics/export.json").read())["max_abs_diff"] > 1e-12
    first = backbone_files.ONNX.read_bytes()  # written before the check (export.atol is not in the file)
    project.params(backbone={"cut": 2})
    export.main()
    assert backbone_files.ONNX.read_bytes() == first  # the feature store's fingerprint relies on this
    check_export(16)


def test_bad_cut_fails_before_exporting(project):
    project.params(backbone={"cut": "features.99"})
    download.main()
    with pytest.raises(UserError, match="not a graph node"):
        export.main()
    assert not backbone_files.ONNX.exists()
