"""The fine-tune stage: freezing and BatchNorm semantics exactly, LP-FT init, resume, the cached frozen prefix, ONNX
parity, and the fine-tuned model in evaluate and predict. Real MobileNetV2 (random init at tiny sizes where only
shapes and semantics matter; the real weights and digits images for the stage)."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torchvision.models import get_model

from stages import evaluate, extract, finetune, predict, train_heads
from stages.core import backbone_files, finetune_files, head_files
from stages.core.backbones import anatomy
from stages.core.config import FinetuneParams
from stages.core.errors import UserError
from stages.core.feature_files import read_plain_keys, read_split
from stages.core.finetune_data import AugmentedImages, augmentation, split_images
from stages.core.finetune_loop import Inputs, fit
from stages.core.finetune_model import FineTuneNet

SIZE = 32  # random-init nets: shapes and semantics only


def tiny_net(unfreeze, bn="frozen", cut="flatten"):
    model = get_model("mobilenet_v2", weights=None)
    return FineTuneNet(model, anatomy(model), cut, "avg", unfreeze, bn, None, 3, SIZE)


def tensor_inputs(n: int, seed: int) -> Inputs:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, SIZE, SIZE, generator=generator)
    labels = np.arange(n) % 3
    return Inputs(lambda order, _epoch: (images[order[i:i + 4]] for i in range(0, len(order), 4)), labels, False)


def block_parameters(net: FineTuneNet, blocks: list[str]) -> set[str]:
    return {f"backbone.{block}.{name}" for block in blocks
            for name, _ in net.backbone.get_submodule(block).named_parameters()}


@pytest.mark.parametrize("unfreeze, cut, expected", [
    (0, "flatten", []),
    (2, "flatten", ["features.17", "features.18"]),
    (2, "features.5.add", ["features.4", "features.5"]),  # a cut at block 6: the last kept blocks unfreeze
    ("all", "flatten", [f"features.{i}" for i in range(19)]),
])
def test_only_the_last_k_blocks_and_the_head_require_grad(unfreeze, cut, expected):
    net = tiny_net(unfreeze, cut=cut)
    trainable = {name for name, p in net.named_parameters(remove_duplicate=False)
                 if p.requires_grad and name.startswith("backbone.")}
    assert trainable == block_parameters(net, expected)
    assert all(p.requires_grad for p in net.head.parameters())
    assert [b.name for b in net.split.trainable] == expected


def test_unfreeze_beyond_the_kept_blocks_names_the_valid_range():
    with pytest.raises(UserError, match=r"finetune.unfreeze=7: the cut keeps 6 blocks .* valid: 0..6, all, auto"):
        tiny_net(7, cut="features.5.add")


def bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in module.named_buffers()
            if name.endswith(("running_mean", "running_var", "num_batches_tracked"))}


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_batchnorm_policy(bn, tmp_path):
    net = tiny_net(2, bn=bn)
    before = bn_buffers(net.backbone)
    weights_before = {name: p.clone() for name, p in net.backbone.named_parameters()}
    trained = {}  # the weights after the epoch, before fit restores the best epoch's (maybe epoch 0's)

    def snapshot(_epoch):
        trained.update(bn_buffers(net.backbone), **{n: p.clone() for n, p in net.backbone.named_parameters()})

    fit(net, tensor_inputs(12, 0), tensor_inputs(6, 1), FinetuneParams(epochs=1, batch_size=4, lr_backbone=1e-2),
        seed=0, checkpoint=tmp_path / "c.pt", device=torch.device("cpu"), on_epoch_end=snapshot)
    after = {name: trained[name] for name in before}
    tail = tuple(f"{b}." for b in ("features.17", "features.18"))
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    frozen_part = {name for name in before if not name.startswith(tail)}
    assert not changed & frozen_part  # the frozen blocks' statistics: bitwise unchanged, whatever the policy
    if bn == "frozen":
        assert not changed
    else:
        assert changed and all(name.startswith(tail) for name in changed)
    moved = {name for name in weights_before if not torch.equal(trained[name], weights_before[name])}
    assert moved and all(name.startswith(tail) for name in moved)  # the tail trained, nothing else


def test_an_interrupted_run_resumes_from_its_last_epoch_and_ends_where_an_uninterrupted_one_does(tmp_path):
    params = FinetuneParams(epochs=3, batch_size=4, patience=5)
    torch.manual_seed(0)
    reference = tiny_net(1)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    outcome = fit(reference, tensor_inputs(12, 0), tensor_inputs(6, 1), params, 0, tmp_path / "a.pt",
                  torch.device("cpu"))

    class Killed(Exception):
        pass

    def kill_after_epoch_1(epoch: int) -> None:
        if epoch == 1:
            raise Killed

    interrupted = tiny_net(1)
    interrupted.load_state_dict(state)
    with pytest.raises(Killed):
        fit(interrupted, tensor_inputs(12, 0), tensor_inputs(6, 1), params, 0, tmp_path / "b.pt",
            torch.device("cpu"), on_epoch_end=kill_after_epoch_1)
    resumed = tiny_net(1)  # a new process: fresh weights, everything comes from the checkpoint
    again = fit(resumed, tensor_inputs(12, 0), tensor_inputs(6, 1), params, 0, tmp_path / "b.pt",
                torch.device("cpu"))
    assert again.resumed_from == 1
    assert [r["val_loss"] for r in again.history] == [r["val_loss"] for r in outcome.history]
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_a_checkpoint_of_another_network_is_not_resumed(tmp_path):
    params = FinetuneParams(epochs=1, batch_size=4)
    fit(tiny_net(1), tensor_inputs(8, 0), tensor_inputs(4, 1), params, 0, tmp_path / "c.pt", torch.device("cpu"))
    other = tiny_net(3)
    outcome = fit(other, tensor_inputs(8, 0), tensor_inputs(4, 1), params, 0, tmp_path / "c.pt",
                  torch.device("cpu"))
    assert outcome.resumed_from is None and len(outcome.history) == 2


def test_from_scratch_trains_every_parameter():
    net = tiny_net("all")
    used = list(net.tail.parameters()) + list(net.head.parameters())  # all but the old task's classifier
    assert all(p.requires_grad for p in used) and len(used) > 150
    assert net.split.prefix_node is None and not list(net.prefix.parameters())


def test_augmentation_is_seeded_per_epoch_and_image(exported, monkeypatch):
    monkeypatch.chdir(exported)
    preprocessing = backbone_files.load().preprocessing
    images = split_images("train")
    augment = augmentation(FinetuneParams().augment, preprocessing)
    dataset = AugmentedImages(images.requests, augment, seed=0)
    first = dataset[0][0]
    assert torch.equal(first, dataset[0][0])
    dataset.epoch = 1
    assert not torch.equal(first, dataset[0][0])
    assert augmentation(FinetuneParams(augment={"random_resized_crop": False, "hflip": False}).augment,
                        preprocessing) is None


# --- the stage, on the real MobileNetV2 and digits images --------------------------------------------------------
HEADS = {"logreg": {"type": "logistic", "C": [1.0]},
         "knn": {"type": "sklearn", "estimator": "sklearn.neighbors.KNeighborsClassifier",
                 "grid": {"n_neighbors": [1]}}}
NO_AUGMENT = {"random_resized_crop": False, "hflip": False, "color_jitter": 0.0}


def set_params(**sections) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    for section, values in sections.items():
        params[section] = {**params[section], **values} if isinstance(values, dict) and section != "heads" else values
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def heads_trained(exported, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finetune") / "project"
    shutil.copytree(exported, root)
    with contextlib.chdir(root):
        set_params(heads=HEADS, finetune={"init_head": "logreg"})
        extract.main()
        train_heads.main()
    return root


@pytest.fixture
def project_with_heads(heads_trained, tmp_path, monkeypatch) -> Path:
    work = tmp_path / "work"
    shutil.copytree(heads_trained, work)
    monkeypatch.chdir(work)
    return work


def test_lp_ft_starts_exactly_where_the_init_head_is(project_with_heads):
    set_params(finetune={"enabled": True, "unfreeze": 1, "epochs": 1, "batch_size": 8, "augment": NO_AUGMENT})
    finetune.main()
    metrics = json.loads(Path("metrics/finetune.json").read_text())
    head = head_files.load("logreg")
    assert metrics["val_accuracy_at_init"] == head.meta["val_accuracy"]
    assert metrics["cached_prefix"] is True and metrics["unfreeze"] == 1 and metrics["onnx_max_abs_diff"] < 1e-4

    # the ONNX model on the test images: what evaluate scores, and what predict gives
    test = read_split("test").plain()
    evaluate.main()
    scores = json.loads(Path("metrics/evaluate.json").read_text())
    assert set(scores) == {"logreg", "knn", "finetune"}
    probabilities = finetune_files.read_test_scores(read_plain_keys("test"))
    assert scores["finetune"]["accuracy"] == pytest.approx(float(np.mean(probabilities.argmax(1) == test.labels)))
    assert "| finetune" in Path("reports/summary.md").read_text()
    assert Path("plots/confusion/finetune.csv").is_file()
    results = predict.predict([Path(p) for p in test.paths], "finetune", top_k=2)
    classes = test.classes
    assert [r.top[0][0] for r in results] == [classes[i] for i in probabilities.argmax(1)]
    assert np.allclose([r.top[0][1] for r in results], probabilities.max(1), atol=1e-5)
    history = Path("plots/finetune/history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,val_loss,train_accuracy,val_accuracy" and len(history) == 3


def test_the_cached_prefix_gives_the_full_forward_result(project_with_heads):
    backbone = backbone_files.load()
    params = FinetuneParams(epochs=2, batch_size=8, lr_backbone=1e-3, augment=NO_AUGMENT)
    head = head_files.load("logreg")
    train, val = split_images("train"), split_images("val")
    results = []
    for cached in (False, True):
        net = FineTuneNet(backbone.model(), backbone.anatomy, "flatten", "avg", 2, "frozen", head,
                          len(head.classes), backbone.preprocessing.crop)
        store = Path("store")
        train_in = finetune.inputs_for(net, train, None, cached, store, "prefix-test", backbone.preprocessing, 8)
        val_in = finetune.inputs_for(net, val, None, cached, store, "prefix-test", backbone.preprocessing, 8)
        assert train_in.from_prefix is cached
        outcome = fit(net, train_in, val_in, params, 0, Path(f"ckpt-{cached}.pt"), torch.device("cpu"))
        results.append((outcome, {k: v.clone() for k, v in net.head.state_dict().items()}))
    (full, full_head), (fast, fast_head) = results
    assert np.allclose([r["val_loss"] for r in full.history], [r["val_loss"] for r in fast.history], atol=1e-4)
    assert fast.history[-1]["train_loss"] != full.history[0]["val_loss"]  # it trained
    assert fast.history[1]["val_loss"] != fast.history[0]["val_loss"]  # the first epoch's updates moved the model
    for key in full_head:
        assert torch.allclose(full_head[key], fast_head[key], atol=1e-4), key


def test_init_head_must_be_a_network_head(project_with_heads):
    set_params(finetune={"enabled": True, "init_head": "knn"})
    with pytest.raises(UserError, match=r"finetune.init_head: 'knn' is a pickled .* valid: logreg"):
        finetune.main()


def test_disabling_finetune_removes_the_model_from_evaluate(project_with_heads):
    set_params(finetune={"enabled": True, "unfreeze": 0, "epochs": 1, "batch_size": 8, "augment": NO_AUGMENT})
    finetune.main()
    assert finetune_files.trained()
    set_params(finetune={"enabled": False})
    finetune.main()
    assert not finetune_files.trained()
    assert json.loads(Path("metrics/finetune.json").read_text()) == {"skipped": True}
    evaluate.main()
    assert "finetune" not in json.loads(Path("metrics/evaluate.json").read_text())
