"""The fine-tune stage: freezing and BatchNorm semantics exactly, LP-FT init, resume, the cached frozen prefix, ONNX
parity, and the fine-tuned model in evaluate and predict. Real MobileNetV2 (random init at tiny sizes where only
shapes and semantics matter; the real weights and digits images for the stage)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import onnx
import yaml
from torch import nn
from torchvision.models import get_model
from torchvision.models.feature_extraction import create_feature_extractor

from stages import evaluate, extract, finetune, train_heads
from tests.conftest import built_once, work_copy
from transfer_learning.backbone import files as backbone_files
from transfer_learning.backbone.anatomy import anatomy
from transfer_learning.common.curves import NOTHING_TO_PLOT
from transfer_learning.common.errors import UserError
from transfer_learning.common.hashing import sha256_file
from transfer_learning.deploy import predict
from transfer_learning.features.split_files import read_plain_keys, read_split
from transfer_learning.finetune import curves as finetune_curves
from transfer_learning.finetune import files as finetune_files
from transfer_learning.finetune import run as finetune_run
from transfer_learning.features.views import ViewDataset
from transfer_learning.finetune.data import AugmentedImages, augmentation, image_batches, split_images
from transfer_learning.finetune.loop import CHECKPOINT_KEYS, Inputs, fit, save_checkpoint
from transfer_learning.finetune.model import FineTuneNet
from transfer_learning.heads import files as head_files
from transfer_learning.params import FinetuneParams, load_params

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


def test_an_interrupted_run_resumes_from_its_last_epoch_and_ends_where_an_uninterrupted_one_does_curves_too(tmp_path):
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

    # the dvclive curves of the resumed run are those of the uninterrupted one
    files = curve_files(outcome.history, tmp_path / "uninterrupted")
    assert curve_files(again.history, tmp_path / "resumed") == files
    assert set(files) == {f"plots/metrics/{c}.tsv" for c in finetune_curves.CURVES}  # no summary: not a plot
    folder = tmp_path / "uninterrupted" / finetune_curves.PLOTS_DIR / "plots/metrics"
    for curve in finetune_curves.CURVES:  # step = epoch; epoch 0 (before any update) has val curves only
        expected = [(r["epoch"], r[curve]) for r in outcome.history if r[curve] is not None]
        assert read_curve(folder / f"{curve}.tsv") == expected
        assert [step for step, _ in expected] == ([0, 1, 2, 3] if curve.startswith("val") else [1, 2, 3])


def curve_files(history: list[dict], folder: Path) -> dict[str, bytes]:
    """What write_curves makes of `history` in `folder`: {path under plots/finetune: bytes}."""
    folder.mkdir()
    with contextlib.chdir(folder):
        finetune_curves.write_curves(history)
        return {str(f.relative_to(finetune_curves.PLOTS_DIR)): f.read_bytes()
                for f in sorted(finetune_curves.PLOTS_DIR.rglob("*")) if f.is_file()}


def read_curve(path: Path) -> list[tuple[int, float]]:
    header, *rows = path.read_text().splitlines()
    assert header == f"step\t{path.stem}"
    return [(int(step), float(value)) for step, value in (row.split("\t") for row in rows)]


def test_a_checkpoint_of_another_network_is_not_resumed(tmp_path):
    params = FinetuneParams(epochs=1, batch_size=4)
    fit(tiny_net(1), tensor_inputs(8, 0), tensor_inputs(4, 1), params, 0, tmp_path / "c.pt", torch.device("cpu"))
    other = tiny_net(3)
    outcome = fit(other, tensor_inputs(8, 0), tensor_inputs(4, 1), params, 0, tmp_path / "c.pt",
                  torch.device("cpu"))
    assert outcome.resumed_from is None and len(outcome.history) == 2


# --- what a resumed run trusts: the checkpoint and the fresh head -----------------------------------------------------
SMALL_CUT = "features.5.add"  # a short net: these tests are about files and seeds, not capacity
CPU = torch.device("cpu")


class Killed(Exception):
    pass


def seeded_net(unfreeze=1) -> FineTuneNet:
    """The same backbone weights every call (a pretrained backbone in the stage); the head is the net's own."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_model("mobilenet_v2", weights=None)
    return FineTuneNet(model, anatomy(model), SMALL_CUT, "avg", unfreeze, "frozen", None, 3, SIZE)


def kill_after_epoch_1(epoch: int) -> None:
    if epoch == 1:
        raise Killed


def without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def flip_float_exponent(path: Path, payload: bytes) -> None:
    """Flips one exponent bit of a float32 in the middle of `payload`, where that sits in the file (tensor data,
    ONNX weights, an npz array: stored uncompressed), as a bad disk or a bad copy would."""
    data = bytearray(path.read_bytes())
    start = data.find(payload)
    assert start >= 0 and len(payload) >= 8
    data[start + (len(payload) // 8) * 4 + 3] ^= 0x40
    path.write_bytes(bytes(data))


def largest_tensor_bytes(checkpoint: Path) -> bytes:
    with zipfile.ZipFile(checkpoint) as archive:
        entry = max((e for e in archive.infolist() if "/data/" in e.filename), key=lambda e: e.file_size)
        return archive.read(entry)


def largest_onnx_weights(path: Path) -> bytes:
    return max((t.raw_data for t in onnx.load(str(path)).graph.initializer), key=len)


def test_a_checkpoint_with_a_flipped_byte_is_moved_aside_and_the_run_retrains(tmp_path, caplog):
    params = FinetuneParams(epochs=2, batch_size=4, patience=5)
    reference = seeded_net()
    expected = fit(reference, tensor_inputs(8, 0), tensor_inputs(4, 1), params, 0, tmp_path / "a.pt", CPU)
    checkpoint = tmp_path / "b.pt"
    with pytest.raises(Killed):
        fit(seeded_net(), tensor_inputs(8, 0), tensor_inputs(4, 1), params, 0, checkpoint, CPU,
            on_epoch_end=kill_after_epoch_1)
    flip_float_exponent(checkpoint, largest_tensor_bytes(checkpoint))

    resumed = seeded_net()
    with caplog.at_level(logging.WARNING):
        outcome = fit(resumed, tensor_inputs(8, 0), tensor_inputs(4, 1), params, 0, checkpoint, CPU)
    assert outcome.resumed_from is None  # not loaded: trained again from epoch 0
    assert f"checkpoint {checkpoint} rejected: its sha256" in caplog.text and "b.pt.rejected-" in caplog.text
    assert len(list(tmp_path.glob("b.pt.rejected-*"))) == 1  # kept aside for a look, never read again
    assert without_seconds(outcome.history) == without_seconds(expected.history)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


class RunsCode:
    """Unpickling this creates `marker`: what a crafted checkpoint in a shared store could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_checkpoint_that_would_run_code_is_never_unpickled(tmp_path, caplog):
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "c.pt"
    # a crafted checkpoint with a matching digest: only weights_only stands between it and the code
    save_checkpoint(checkpoint, {**dict.fromkeys(CHECKPOINT_KEYS), "net": {}, "history": [RunsCode(marker)]})
    shutil.copyfile(checkpoint, tmp_path / "copy.pt")
    torch.load(tmp_path / "copy.pt", weights_only=False)
    assert marker.exists()  # the payload is real
    marker.unlink()

    with caplog.at_level(logging.WARNING):
        outcome = fit(seeded_net(), tensor_inputs(8, 0), tensor_inputs(4, 1), FinetuneParams(epochs=1, batch_size=4),
                      0, checkpoint, CPU)
    assert not marker.exists()
    assert "holds more than tensors and plain containers, not unpickled" in caplog.text
    assert outcome.resumed_from is None and len(outcome.history) == 2
    assert len(list(tmp_path.glob("c.pt.rejected-*"))) == 1


def test_two_kills_while_replacing_the_checkpoint_keep_the_one_on_disk(tmp_path):
    from transfer_learning.finetune.loop import _read_verified

    checkpoint = tmp_path / "d.pt"

    def state(epoch: int) -> dict:
        return {**dict.fromkeys(CHECKPOINT_KEYS), "net": {"w": torch.full((4,), float(epoch))}, "epoch": epoch}

    on_disk = save_checkpoint(checkpoint, state(1))
    # A real failure at the moment a kill would hit: the checkpoint's temp file cannot be created (a folder
    # holds its name), after the digest file already names the new checkpoint.
    blocker = checkpoint.with_name(f".{checkpoint.name}.{os.getpid()}.tmp")
    for epoch in (2, 3):  # the first kill, then the resumed run's own kill in the same window
        blocker.mkdir()
        with pytest.raises(OSError):
            save_checkpoint(checkpoint, state(epoch), previous=on_disk)
        blocker.rmdir()
        saved, digest = _read_verified(checkpoint)  # what the next run loads
        assert digest == on_disk and saved["epoch"] == 1
def test_a_fresh_head_is_seeded_so_runs_and_resumptions_start_alike(tmp_path):
    def net_after_global_rng(seed: int) -> FineTuneNet:
        torch.manual_seed(seed)  # whatever the process did before must not matter
        return seeded_net()

    first, second = net_after_global_rng(1), net_after_global_rng(2)
    for key, value in first.head.state_dict().items():
        assert torch.equal(value, second.head.state_dict()[key]), key
    params = FinetuneParams(epochs=1, batch_size=4)
    expected = fit(first, tensor_inputs(8, 0), tensor_inputs(4, 1), params, 0, tmp_path / "a.pt", CPU)

    def dies_in_epoch_1(order, epoch):
        raise Killed

    checkpoint = tmp_path / "b.pt"
    with pytest.raises(Killed):  # killed before epoch 1 ends: no checkpoint, the next run starts over
        fit(net_after_global_rng(3), Inputs(dies_in_epoch_1, np.arange(8) % 3, False), tensor_inputs(4, 1), params,
            0, checkpoint, CPU)
    assert not checkpoint.exists()
    again = fit(net_after_global_rng(4), tensor_inputs(8, 0), tensor_inputs(4, 1), params, 0, checkpoint, CPU)
    assert without_seconds(again.history) == without_seconds(expected.history)


# fp16 autocast on CUDA: losses agree within this relative tolerance, not exactly (rounding, cuDNN's kernels)
AUTOCAST_RTOL = 1e-2


@pytest.mark.gpu
def test_one_epoch_with_autocast_on_cuda_then_resume(tmp_path):
    cuda = torch.device("cuda")
    params = FinetuneParams(epochs=2, batch_size=4, patience=5)
    expected = fit(seeded_net(), tensor_inputs(8, 0), tensor_inputs(4, 1), params, 0, tmp_path / "a.pt", cuda)
    checkpoint = tmp_path / "b.pt"
    with pytest.raises(Killed):
        fit(seeded_net(), tensor_inputs(8, 0), tensor_inputs(4, 1), params, 0, checkpoint, cuda,
            on_epoch_end=kill_after_epoch_1)
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["scaler"] and saved["cuda_rng"]  # the GradScaler ran, the CUDA RNG state is kept
    outcome = fit(seeded_net(), tensor_inputs(8, 0), tensor_inputs(4, 1), params, 0, checkpoint, cuda)
    assert outcome.resumed_from == 1
    np.testing.assert_allclose([r["val_loss"] for r in outcome.history], [r["val_loss"] for r in expected.history],
                               rtol=AUTOCAST_RTOL)


@pytest.mark.gpu
def test_a_checkpoint_written_on_the_cpu_resumes_on_cuda(tmp_path):
    params = FinetuneParams(epochs=2, batch_size=4, patience=5)
    checkpoint = tmp_path / "c.pt"
    with pytest.raises(Killed):
        fit(seeded_net(), tensor_inputs(8, 0), tensor_inputs(4, 1), params, 0, checkpoint, CPU,
            on_epoch_end=kill_after_epoch_1)
    assert torch.load(checkpoint, weights_only=True)["scaler"] == {}  # a disabled GradScaler's state
    outcome = fit(seeded_net(), tensor_inputs(8, 0), tensor_inputs(4, 1), params, 0, checkpoint,
                  torch.device("cuda"))
    assert outcome.resumed_from == 1 and len(outcome.history) == 3
    assert all(np.isfinite(r["val_loss"]) for r in outcome.history)


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
    dataset = AugmentedImages(images.requests, augment, preprocessing, seed=0)
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
    def build(root: Path) -> None:
        shutil.copytree(exported, root, dirs_exist_ok=True)
        with contextlib.chdir(root):
            set_params(heads=HEADS, finetune={"init_head": "logreg"})
            extract.main()
            train_heads.main()

    return built_once(tmp_path_factory, "finetune-heads-trained", build)


@pytest.fixture
def project_with_heads(heads_trained, tmp_path, monkeypatch) -> Path:
    return work_copy(heads_trained, tmp_path, monkeypatch)


# the stage's run that the tests below start from: LP-FT of the last two blocks over the cached prefix, one epoch
FINETUNED = {"enabled": True, "unfreeze": 2, "epochs": 1, "batch_size": 8, "augment": NO_AUGMENT}


@pytest.fixture(scope="module")
def finetuned(heads_trained, tmp_path_factory) -> Path:
    """heads_trained with the finetune stage run once (FINETUNED): its ONNX export is the costly part, paid once."""
    def build(root: Path) -> None:
        shutil.copytree(heads_trained, root, dirs_exist_ok=True)
        with contextlib.chdir(root):
            set_params(finetune=FINETUNED)
            finetune.main()

    return built_once(tmp_path_factory, "finetuned", build)


@pytest.fixture
def project_finetuned(finetuned, tmp_path, monkeypatch) -> Path:
    return work_copy(finetuned, tmp_path, monkeypatch)


def test_lp_ft_starts_where_the_init_head_is_within_one_val_image(project_finetuned):
    metrics = json.loads(Path("metrics/finetune.json").read_text())
    head = head_files.load("logreg")
    # the same head on features computed two ways (extract's graph; the prefix's rows through the torch tail, under
    # fp16 autocast on CUDA): rounding apart, so one val image whose top two classes are that close may flip
    one_image = 1 / len(split_images("val"))
    assert metrics["val_accuracy_at_init"] == pytest.approx(head.meta["val_accuracy"], abs=one_image + 1e-9)
    assert metrics["cached_prefix"] is True and metrics["unfreeze"] == 2 and metrics["onnx_max_abs_diff"] < 1e-4
    # the store folders this workspace uses, by name, for `stages.store gc`
    assert Path("store/finetune", metrics["run_fingerprint"], "checkpoint.pt").is_file()
    assert Path("store", metrics["prefix_fingerprint"]).is_dir()

    # the ONNX model on the test images: what evaluate scores, and what predict gives
    test = read_split("test").plain()
    evaluate.main()
    scores = json.loads(Path("metrics/evaluate.json").read_text())
    assert {name for name, value in scores.items() if isinstance(value, dict)} == {"logreg", "knn", "finetune"}
    probabilities = finetune_files.read_test_scores(read_plain_keys("test"))
    assert scores["finetune"]["accuracy"] == pytest.approx(float(np.mean(probabilities.argmax(1) == test.labels)))
    assert "| finetune" in Path("reports/summary.md").read_text()
    assert Path("plots/confusion/finetune.csv").is_file()
    results = predict.predict([Path(p) for p in test.paths], "finetune", top_k=2)
    classes = test.classes
    # the same ONNX model, but other batch shapes: on CUDA other kernels (and TF32, if ORT uses it) round
    # differently, so within 1e-4, and the top class compared where the top two are further apart than that
    top_two = np.sort(probabilities, axis=1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 1e-4
    assert np.array([r.top[0][0] for r in results])[clear].tolist() == \
        [classes[i] for i in probabilities.argmax(1)[clear]]
    assert np.allclose([r.top[0][1] for r in results], probabilities.max(1), atol=1e-4)
    checkpoint = Path("store/finetune", metrics["run_fingerprint"], "checkpoint.pt")
    history = torch.load(checkpoint, weights_only=True)["history"]
    assert [r["epoch"] for r in history] == [0, 1]
    for curve in finetune_curves.CURVES:
        assert read_curve(Path("plots/finetune/plots/metrics", f"{curve}.tsv")) == \
            [(r["epoch"], r[curve]) for r in history if r[curve] is not None]
    assert not Path("plots/finetune/metrics.json").exists()  # in the plotted folder it would be drawn as a chart


def relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| over the larger of 1 and want's largest magnitude: how the export's parity check measures."""
    return float((got - want).abs().max() / max(1.0, float(want.abs().max())))


# Training on the stored rows is compared with training on images at learning rates where one epoch is well
# conditioned (the val loss moves ~5 %, smoothly): the rows differ from torch's by float rounding (~1e-6 relative),
# and a run that diverges (lr_backbone 1e-3 here: val loss 0.66 -> 168) amplifies that into any difference at all.
STABLE = {"lr_head": 1.0e-4, "lr_backbone": 1.0e-5}
TRAINED_RTOL = 1e-3  # measured: 3e-5 between the two paths, whatever the thread count


def test_the_frozen_prefix_rows_are_the_torch_prefix_and_train_the_tail_as_images_do(project_finetuned):
    params = load_params(resolve_estimators=False, resolve_backbone=False)
    prepared = finetune_run.prepare(params, params.finetune.batch_size)  # what the stage trained on: rows reused
    prefix, net = prepared.prefix, prepared.setup.net
    assert prefix.fingerprint == json.loads(Path("metrics/finetune.json").read_text())["prefix_fingerprint"]
    assert net.split.prefix_node == "features.16.add" and prefix.shape == (160, 7, 7)  # unfreeze 2: 17, 18 train
    atol = params.export.atol
    assert prefix.max_abs_diff <= atol

    # the rows against torch's output at the prefix node, computed apart from the exported module, on real images
    val = prepared.val
    reference = create_feature_extractor(prepared.backbone.model(), {"features.16.add": "prefix",
                                                                     "features.15.add": "block_before"})
    dataset = ViewDataset(val.requests, prepared.preprocessing)
    with torch.inference_mode():
        wanted = [reference(x) for x in image_batches(dataset, list(range(len(val))), 8, 0, prepared.preprocessing)]
    torch_rows = torch.cat([w["prefix"] for w in wanted])
    stored = prefix.rows(val, workers=0)
    assert relative_difference(stored, torch_rows) <= atol
    # a prefix cut one block too early gives rows of the same shape: the comparison tells them apart
    assert relative_difference(stored, torch.cat([w["block_before"] for w in wanted])) > 100 * atol
    assert torch.equal(torch.cat(list(prepared.val_inputs.batches(list(range(len(val))), 0))), stored)  # the loop's

    # one epoch on the rows trains what one epoch on the images trains (the tail and head as a function)
    stable = params.finetune.model_copy(update={"epochs": 1, **STABLE})
    trained = {}
    for path, inputs in (("rows", (prepared.train_inputs, prepared.val_inputs)), ("images", None)):
        if inputs is None:
            setup = finetune_run.build_net(params, prepared.backbone, prepared.preprocessing, len(prepared.classes))
            inputs = tuple(finetune_run.inputs_for(images, None, None, prepared.preprocessing, stable.batch_size)
                           for images in (prepared.train, prepared.val))
            net = setup.net
        assert inputs[0].from_prefix is (path == "rows")
        logits = []  # of the trained tail and head on the val rows, before fit restores the best epoch's weights

        def on_epoch_end(_epoch, net=net, logits=logits):
            with torch.inference_mode():
                logits.append(net.eval()(stored, from_prefix=True))

        outcome = fit(net, *inputs, stable, 0, Path(f"ckpt-{path}.pt"), torch.device("cpu"), on_epoch_end)
        trained[path] = outcome.history, logits[-1]
    (rows_history, rows_logits), (images_history, images_logits) = trained["rows"], trained["images"]
    before, after = images_history[0]["val_loss"], images_history[1]["val_loss"]
    assert abs(after - before) > 10 * TRAINED_RTOL * before  # the epoch moved the model, by far more than the rtol
    np.testing.assert_allclose([r["val_loss"] for r in rows_history], [r["val_loss"] for r in images_history],
                               rtol=TRAINED_RTOL)
    assert relative_difference(rows_logits, images_logits) <= TRAINED_RTOL


def test_nothing_damaged_is_used_the_checkpoint_the_kept_export_and_the_model_files(project_finetuned, caplog):
    keys = read_plain_keys("test")
    first = finetune_files.read_test_scores(keys)
    [checkpoint] = Path("store/finetune").glob("*/checkpoint.pt")
    kept, record = checkpoint.parent / "model.onnx", checkpoint.parent / "export.json"
    onnx_file = finetune_files.onnx_path()
    # a retrained run is bit-identical on the CPU; on CUDA (fp16 autocast) within this
    tolerance = 1e-3 if torch.cuda.is_available() else 0

    opset, checkpoint_sha256 = json.loads(record.read_text())["opset"], sha256_file(checkpoint)
    assert finetune_run.kept_export(checkpoint.parent, opset, checkpoint_sha256) == onnx_file.read_bytes()
    flip_float_exponent(kept, largest_onnx_weights(kept))
    assert finetune_run.kept_export(checkpoint.parent, opset, checkpoint_sha256) is None  # so export_onnx exports again
    assert f"the kept ONNX export {kept} does not match the sha256 in {record}" in caplog.text

    flip_float_exponent(checkpoint, largest_tensor_bytes(checkpoint))
    caplog.clear()
    caplog.set_level(logging.INFO, logger="transfer_learning.common.allocator")
    finetune.main()
    assert f"checkpoint {checkpoint} rejected: its sha256" in caplog.text
    assert "keeps freed memory for the next batch" in caplog.text  # the training process's malloc setting
    assert json.loads(Path("metrics/finetune.json").read_text())["resumed_from_epoch"] is None  # retrained
    np.testing.assert_allclose(finetune_files.read_test_scores(keys), first, atol=tolerance)
    assert sha256_file(kept) == json.loads(record.read_text())["sha256"]  # the kept export: made anew

    # a kept export swapped together with its record passes the digest, not the parity check against the
    # verified checkpoint's weights
    flip_float_exponent(kept, largest_onnx_weights(kept))
    record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": sha256_file(kept)}))
    caplog.clear()
    finetune.main()
    assert f"the kept ONNX export {kept} differs from the checkpoint's weights" in caplog.text
    assert json.loads(Path("metrics/finetune.json").read_text())["resumed_from_epoch"] == 1  # not retrained
    np.testing.assert_allclose(finetune_files.read_test_scores(keys), first, atol=tolerance)
    assert sha256_file(kept) == json.loads(record.read_text())["sha256"]  # made anew

    # models/finetune as evaluate and predict find it: each file checked against meta.json before use
    flip_float_exponent(onnx_file, largest_onnx_weights(onnx_file))
    image = Path(read_split("test").paths[0])
    with pytest.raises(UserError, match=r"models/finetune/model.onnx does not match the sha256 in "
                                        r"models/finetune/meta.json .*`dvc repro finetune`"):
        predict.predict([image], "finetune", top_k=1)
    scores_file = finetune_files.FINETUNE_DIR / finetune_files.TEST_SCORES
    with np.load(scores_file) as saved:
        flip_float_exponent(scores_file, saved["probabilities"].tobytes())
    with pytest.raises(UserError, match=r"models/finetune/test_scores.npz does not match the sha256 .*"
                                        r"`dvc checkout models/finetune`"):
        evaluate.main()

    meta_file = finetune_files.FINETUNE_DIR / "meta.json"
    meta_file.write_text(meta_file.read_text()[:-20])  # cut off
    with pytest.raises(UserError, match=r"models/finetune/meta.json is not a JSON object .*`dvc repro finetune`"):
        predict.predict([image], "finetune", top_k=1)


def test_init_head_must_be_a_network_head(project_with_heads):
    set_params(finetune={"enabled": True, "init_head": "knn"})
    with pytest.raises(UserError, match=r"finetune.init_head: 'knn' is a scikit-learn estimator, "
                                        r"not a stack of layers .* valid: logreg"):
        finetune.main()


def test_disabling_finetune_removes_the_model_from_evaluate(project_finetuned):
    assert finetune_files.trained()
    set_params(finetune={"enabled": False})
    finetune.main()
    assert not finetune_files.trained()
    assert json.loads(Path("metrics/finetune.json").read_text()) == {
        "skipped": True, "run_fingerprint": None, "prefix_fingerprint": None}
    # the trained run's curves are gone, and no curve file without rows is left (DVC would draw it empty)
    assert [p.name for p in finetune_curves.PLOTS_DIR.rglob("*")] == [NOTHING_TO_PLOT]
    evaluate.main()
    assert "finetune" not in json.loads(Path("metrics/evaluate.json").read_text())


def test_a_skipped_run_leaves_no_curve_file_only_a_note_dvc_does_not_see(tmp_path):
    """A curve file without rows would be an empty chart in `dvc plots show`; the note is in .dvcignore, so DVC sees
    an empty output folder and draws nothing (on a whole pipeline: tests/test_reports.py)."""
    with contextlib.chdir(tmp_path):
        finetune_files.skip()  # finetune.enabled: false, the default
    folder = tmp_path / finetune_curves.PLOTS_DIR
    assert [p.name for p in folder.rglob("*")] == [NOTHING_TO_PLOT]
    assert (folder / NOTHING_TO_PLOT).read_text().startswith("finetune.enabled is false")
    assert NOTHING_TO_PLOT in (Path(__file__).parents[1] / ".dvcignore").read_text().splitlines()


def test_in_a_git_repository_without_a_commit_the_curves_are_the_same_files(tmp_path, caplog):
    """dvclive 3.49 fails there (it reads the git HEAD): the curves are written in its format without it."""
    history = [{"epoch": 0, "train_loss": None, "train_accuracy": None, "val_loss": 0.9, "val_accuracy": 0.5},
               {"epoch": 1, "train_loss": 0.7, "train_accuracy": 0.6, "val_loss": 0.8, "val_accuracy": 0.55}]
    with_dvclive = curve_files(history, tmp_path / "plain")
    assert "dvclive cannot run" not in caplog.text
    (tmp_path / "fresh").mkdir()
    subprocess.run(["git", "init", "-q"], cwd=tmp_path / "fresh", check=True)
    assert curve_files(history, tmp_path / "fresh" / "work") == with_dvclive
    assert "dvclive cannot run here (Empty git repo)" in caplog.text
    assert set(with_dvclive) == {f"plots/metrics/{c}.tsv" for c in finetune_curves.CURVES}
