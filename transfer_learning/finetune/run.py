"""The finetune stage's work: models/backbone + an init head from train_heads -> models/finetune/ (model.onnx,
model.pt, meta.json, test_scores.npz), the per-epoch curves in plots/finetune/ (dvclive) and the metrics.

LP-FT: the head starts as the linear probe trained on cached features (finetune.init_head), then the last
`finetune.unfreeze` blocks and the head train together at low learning rates. When the frozen prefix sees no
augmentation, its outputs are computed once, in ONNX Runtime as extract computes features (finetune/prefix.py), and
kept in the feature store: every epoch runs only the tail.
With finetune.enabled false (the default) the stage only records that it was skipped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from transfer_learning.backbone import files as backbone_files
from transfer_learning.backbone import onnx_export
from transfer_learning.common.allocator import keep_freed_memory
from transfer_learning.common.atomic import atomic_write, atomic_write_text
from transfer_learning.common.errors import UserError
from transfer_learning.common.hashing import sha256_bytes, sha256_file
from transfer_learning.data import manifest
from transfer_learning.data.images import Preprocessing
from transfer_learning.features.runtime import FeatureRunner
from transfer_learning.features.store import resolve_store
from transfer_learning.features.views import ViewDataset, collate
from transfer_learning.finetune import files as finetune_files
from transfer_learning.finetune.data import (
    AugmentedImages,
    LabelledImages,
    augmentation,
    image_batches,
    split_images,
)
from transfer_learning.finetune.distributed import Group
from transfer_learning.finetune.curves import write_curves
from transfer_learning.finetune.files import FINETUNE_DIR, LOGITS, PROBABILITIES
from transfer_learning.finetune.loop import Inputs, fit
from transfer_learning.finetune.model import FineTuneNet, Probabilities
from transfer_learning.finetune.prefix import Checked, FrozenPrefix, frozen_prefix
from transfer_learning.heads import files as head_files
from transfer_learning.params import Params

log = logging.getLogger("finetune")
for noisy in ("onnx_ir", "onnxscript"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
WORKERS = 2
ORT_BATCH = 64  # images per ONNX Runtime call for the test scores
SEED = 0  # the fresh head's init, the shuffling, the augmentation, dropout
# how many processes train, and where: the same run up to float rounding (finetune/loop.py), so a checkpoint is
# resumed whatever they are
DISTRIBUTION = {"nproc", "nnodes", "rdzv_endpoint"}
FINETUNE_VERSION = 2  # bump when a change to the loop makes old checkpoints wrong (2: the fresh head is seeded)


def resolve_unfreeze(unfreeze: int | str) -> int | str:
    if unfreeze != "auto":
        return unfreeze
    from transfer_learning.advise.advisor import recommended_unfreeze

    chosen = recommended_unfreeze()
    log.info("finetune.unfreeze: auto -> %r (metrics/advice.json, reports/advice.md)", chosen)
    return chosen


def init_head(name: str | None) -> head_files.Head | None:
    if name is None:
        return None
    head = head_files.load(name)
    if head.arrays is None:
        layered = [n for n in head_files.trained_names() if head_files.load(n).arrays is not None]
        raise UserError(f"finetune.init_head: {name!r} is a scikit-learn estimator, not a stack of layers a network can "
                        f"start from; valid: {', '.join(layered) or 'none'} (heads of type logistic, linear, mlp) "
                        "or null for a fresh head")
    return head


def run_fingerprint(params: Params, unfreeze: int | str, bn: str, head: head_files.Head | None,
                    train: LabelledImages, val: LabelledImages, prefix_rows: str | None = None) -> str:
    """Everything the training depends on: a checkpoint is resumed only under the same fingerprint. `prefix_rows`
    is the store fingerprint of the frozen prefix's rows the run reads (val always, train when cached): rows of
    another export of the prefix are other inputs, so a checkpoint trained on them is not this run's."""
    spec = {
        "version": FINETUNE_VERSION,
        "finetune": {**params.finetune.model_dump(exclude={"enabled", *DISTRIBUTION}), "unfreeze": unfreeze, "bn": bn},
        "weights": sha256_file(backbone_files.WEIGHTS),
        "cut": params.backbone.cut, "pool": params.backbone.pool,
        "head": None if head is None else hashlib.sha256(
            json.dumps(head.meta, sort_keys=True).encode()
            + b"".join(head.arrays[k].tobytes() for k in sorted(head.arrays))).hexdigest(),
        "train": [[r.sha256, int(y)] for r, y in zip(train.requests, train.labels)],
        "val": [[r.sha256, int(y)] for r, y in zip(val.requests, val.labels)],
        "classes": manifest.read_classes(),
        "bit_depth": manifest.read_bit_depth(),
        # what the evaluation preprocessing makes of the probe images with this process's code and libraries
        "pixels": backbone_files.load().preprocessing.with_bit_depth(manifest.read_bit_depth()).probe_digest(),
    }
    if prefix_rows is not None:
        spec["prefix_rows"] = prefix_rows
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def inputs_for(images: LabelledImages, augment, prefix: FrozenPrefix | None, preprocessing,
               batch_size: int) -> Inputs:
    """The split as the loop takes it: the frozen prefix's stored outputs when `prefix` is given, else images
    (augmented when `augment` is)."""
    if prefix is not None:
        cached = prefix.rows(images, WORKERS)
        return Inputs(lambda order, _epoch: (cached[order[i:i + batch_size]]
                                             for i in range(0, len(order), batch_size)),
                      images.labels, from_prefix=True)
    if augment is None:
        dataset = ViewDataset(images.requests, preprocessing)
        return Inputs(lambda order, _epoch: image_batches(dataset, order, batch_size, WORKERS, preprocessing),
                      images.labels, from_prefix=False)
    dataset = AugmentedImages(images.requests, augment, preprocessing, seed=SEED)

    def batches(order, epoch):
        dataset.epoch = epoch
        return image_batches(dataset, order, batch_size, WORKERS, preprocessing)

    return Inputs(batches, images.labels, from_prefix=False)


def test_probabilities(onnx_model: bytes, images: LabelledImages, preprocessing, providers: list[str]) -> np.ndarray:
    runner = FeatureRunner(onnx_model, providers, ORT_BATCH)
    out = []
    for batch, _, errors in DataLoader(ViewDataset(images.requests, preprocessing), batch_size=ORT_BATCH,
                                       num_workers=WORKERS, collate_fn=collate):
        if errors:
            raise UserError(f"cannot read {len(errors)} test image(s): " + "; ".join(errors[:5]))
        out.append(runner(preprocessing.normalize(batch).numpy()))
    return np.concatenate(out) if out else np.zeros((0, len(manifest.read_classes())), np.float32)


def kept_export(run_dir: Path, opset: int, checkpoint_sha256: str | None) -> bytes | None:
    """The ONNX bytes of this run's kept export when it was made with this opset from this very checkpoint and
    still has the sha256 recorded then; None (export again) otherwise, said in the log."""
    kept, record_file = run_dir / "model.onnx", run_dir / "export.json"
    if not (kept.is_file() and record_file.is_file()):
        return None
    try:
        record = json.loads(record_file.read_text())
        data = kept.read_bytes()
    except (OSError, ValueError) as error:
        log.warning("the kept ONNX export %s cannot be read (%s): exporting again", kept, error)
        return None
    if record.get("opset") != opset or record.get("checkpoint_sha256") != checkpoint_sha256:
        log.info("the kept ONNX export %s is of another opset or checkpoint: exporting again", kept)
        return None
    if sha256_bytes(data) != record.get("sha256"):
        log.warning("the kept ONNX export %s does not match the sha256 in %s (damaged or replaced): exporting again",
                    kept, record_file)
        return None
    return data


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def export_onnx(net: FineTuneNet, onnx_file: Path, run_dir: Path, preprocessing, opset: int, atol: float,
                checkpoint_sha256: str | None, prefix: FrozenPrefix | None = None) -> tuple[float, bytes]:
    """Exports and parity-checks the model (with a frozen `prefix`, its checked export joined to the tail's:
    finetune/composed.py); a finished run's kept export is reused instead once it passes the
    same parity check against `net` (the verified checkpoint's weights): its digest beside it in a shared store
    catches damage, the parity check also a file swapped together with its record. Returns the largest
    ONNX-vs-torch difference (relative, for the logits) and the ONNX bytes written to `onnx_file`."""
    from transfer_learning.backbone.export import parity_batches
    # here, not at the top: it imports onnx (~2 CPU-s), which a rank that only trains never needs
    from transfer_learning.finetune.composed import export_joined

    batches = parity_batches(preprocessing.transform())
    kept = kept_export(run_dir, opset, checkpoint_sha256)
    if kept is not None:
        write_bytes(onnx_file, kept)
        max_abs_diff = onnx_export.parity(Probabilities(net), onnx_file, batches, relative=True)
        if max_abs_diff <= atol:
            log.info("reused the ONNX export of this finished run from %s (parity with the checkpoint's weights "
                     "re-checked: %.3g)", run_dir / "model.onnx", max_abs_diff)
            return max_abs_diff, kept
        log.warning("the kept ONNX export %s differs from the checkpoint's weights by %.3g > export.atol %g: "
                    "exporting again", run_dir / "model.onnx", max_abs_diff, atol)
    if prefix is None:
        onnx_export.export(Probabilities(net), batches[0], onnx_file, opset, (PROBABILITIES, LOGITS))
    else:
        export_joined(net, prefix.onnx, prefix.shape, batches[0], onnx_file, opset, (PROBABILITIES, LOGITS))
    max_abs_diff = onnx_export.parity(Probabilities(net), onnx_file, batches, relative=True)
    data = onnx_file.read_bytes()
    write_bytes(run_dir / "model.onnx", data)
    record = {"opset": opset, "max_abs_diff": max_abs_diff, "sha256": sha256_bytes(data),
              "checkpoint_sha256": checkpoint_sha256}
    atomic_write_text(run_dir / "export.json", json.dumps(record) + "\n")  # after the file it vouches for
    return max_abs_diff, data


@dataclass
class Setup:
    """The network to train and what decided its shape (recorded in meta.json and the metrics)."""

    net: FineTuneNet
    cut_node: str
    unfreeze: int | str
    bn: str
    head: head_files.Head | None
    trainable: list[str]


def build_net(params: Params, backbone: backbone_files.Backbone, preprocessing, num_classes: int) -> Setup:
    """The backbone cut at backbone.cut, its last finetune.unfreeze blocks trainable, the init head on top."""
    settings = params.finetune
    cut_node = backbone.anatomy.cut_node(params.backbone.cut)
    unfreeze = resolve_unfreeze(settings.unfreeze)
    head = init_head(settings.init_head)
    bn = settings.bn
    if backbone.weights is None and bn == "frozen":
        # frozen statistics are the pretraining data's; a random init has none (mean 0, var 1): measured, a
        # from-scratch run with them frozen stays at chance (train loss 2.303 after an epoch)
        log.info("finetune.bn: frozen, but backbone.weights is none: the unfrozen blocks' BatchNorm trains")
        bn = "train"
    net = FineTuneNet(backbone.model(), backbone.anatomy, cut_node, params.backbone.pool, unfreeze, bn,
                      head, num_classes, preprocessing.crop, seed=SEED)
    trainable = [b.name for b in net.split.trainable]
    log.info("unfreeze %r: training %s + the head (%s); %d backbone blocks frozen; bn %s",
             unfreeze, ", ".join(trainable) or "no backbone block", settings.init_head or "fresh head",
             len(net.split.kept) - len(trainable), bn)
    return Setup(net, cut_node, unfreeze, bn, head, trainable)


@dataclass
class Prepared:
    """The network and its inputs, with what they were derived from."""

    setup: Setup
    backbone: backbone_files.Backbone
    preprocessing: Preprocessing
    classes: list[str]
    train: LabelledImages
    val: LabelledImages
    test: LabelledImages
    train_inputs: Inputs
    val_inputs: Inputs
    cache_train: bool
    prefix: FrozenPrefix | None  # the exported frozen prefix, its rows' store folder; None: no frozen prefix
    store: Path

    @property
    def prefix_fp(self) -> str | None:
        return None if self.prefix is None else self.prefix.fingerprint


def prepare(params: Params, batch_size: int, checked: Checked | None = None) -> Prepared:
    """The net (finetune.unfreeze, init_head, bn) and its inputs in batches of `batch_size`; the frozen prefix's
    outputs are computed here for the images the store lacks. `checked`: the prefix export the launcher checked."""
    settings = params.finetune
    backbone = backbone_files.load()
    preprocessing = backbone.preprocessing.with_bit_depth(manifest.read_bit_depth())
    classes = manifest.read_classes()
    setup = build_net(params, backbone, preprocessing, len(classes))
    net = setup.net

    train, val, test = (split_images(split) for split in ("train", "val", "test"))
    if len(train) == 0 or len(val) == 0:
        raise UserError("finetune needs train and val images: check data.val_fraction and the data source")
    augment = augmentation(settings.augment, preprocessing)
    has_prefix = net.split.prefix_node is not None
    cache_train = has_prefix and (augment is None or settings.cache_prefix)
    if cache_train and augment is not None:
        log.info("finetune.cache_prefix: true: the frozen prefix sees un-augmented images, finetune.augment is not used")
        augment = None
    store = resolve_store(params.extract.store)
    prefix = frozen_prefix(net, backbone, setup.cut_node, preprocessing, params.export, params.extract.providers,
                           store, checked) if has_prefix else None
    train_inputs = inputs_for(train, augment, prefix if cache_train else None, preprocessing, batch_size)
    val_inputs = inputs_for(val, None, prefix, preprocessing, batch_size)
    return Prepared(setup, backbone, preprocessing, classes, train, val, test, train_inputs, val_inputs, cache_train,
                    prefix, store)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train(params: Params, group: Group | None = None, checked: Checked | None = None) -> dict | None:
    """Trains (alone, or as one rank of `group`) and writes models/finetune/, the curves and the checkpoint; returns
    the metrics (None on a rank other than 0, which writes nothing). `checked`: the prefix export the launcher
    checked against torch."""
    started = time.perf_counter()
    keep_freed_memory()
    settings = params.finetune
    device = default_device() if group is None else group.device
    world = 1 if group is None else group.world
    prepared = prepare(params, settings.batch_size // world, checked)
    setup, net = prepared.setup, prepared.setup.net
    run_fp = run_fingerprint(params, setup.unfreeze, setup.bn, setup.head, prepared.train, prepared.val,
                             prepared.prefix_fp)
    checkpoint = prepared.store / "finetune" / run_fp / "checkpoint.pt"
    log.info("training on %s%s; checkpoint %s", device, "" if group is None else f" (rank {group.rank} of {world})",
             checkpoint)
    outcome = fit(net, prepared.train_inputs, prepared.val_inputs, settings, seed=SEED, checkpoint=checkpoint,
                  device=device, group=group)
    if group is not None:
        group.close()  # every rank has trained; rank 0 alone writes the outputs
        if not group.leader:
            return None
    net.cpu().eval()
    max_abs_diff = write_outputs(params, setup, outcome, checkpoint, prepared.backbone, prepared.preprocessing,
                                 prepared.classes, prepared.test, prepared.prefix)
    best = outcome.history[outcome.best_epoch]
    trained_epochs = [r for r in outcome.history if r["epoch"] > 0]
    log.info("fine-tuned (unfreeze %r): best epoch %d, val accuracy %.4f (%.4f before any update) -> %s",
             setup.unfreeze, outcome.best_epoch, best["val_accuracy"], outcome.history[0]["val_accuracy"],
             FINETUNE_DIR)
    return {  # the two fingerprints name the store folders this workspace uses (`stages.store gc` keeps them)
        "skipped": False,
        "run_fingerprint": run_fp,
        "prefix_fingerprint": prepared.prefix_fp,
        "unfreeze": setup.unfreeze,
        "trainable_blocks": len(setup.trainable),
        "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad),
        "init_head": settings.init_head,
        "cached_prefix": prepared.cache_train,
        "prefix_onnx_max_abs_diff": None if prepared.prefix is None else prepared.prefix.max_abs_diff,
        "device": device.type,
        "processes": world,
        "epochs_run": len(outcome.history) - 1,
        "best_epoch": outcome.best_epoch,
        "val_accuracy_at_init": outcome.history[0]["val_accuracy"],
        "val_accuracy": best["val_accuracy"],
        "val_loss": best["val_loss"],
        "epoch_seconds": round(float(np.mean([r["seconds"] for r in trained_epochs])), 2) if trained_epochs else None,
        "resumed_from_epoch": outcome.resumed_from,
        "onnx_max_abs_diff": max_abs_diff,
        "seconds": round(time.perf_counter() - started, 2),
    }


def write_outputs(params: Params, setup: Setup, outcome, checkpoint: Path, backbone: backbone_files.Backbone,
                  preprocessing, classes: list[str], test: LabelledImages,
                  prefix: FrozenPrefix | None = None) -> float:
    """models/finetune/ (the verified ONNX export, the state dict, test scores, meta.json last) and the curves;
    returns the ONNX export's largest difference from torch."""
    net = setup.net
    shutil.rmtree(FINETUNE_DIR, ignore_errors=True)
    FINETUNE_DIR.mkdir(parents=True)
    onnx_file = finetune_files.onnx_path()
    max_abs_diff, onnx_model = export_onnx(net, onnx_file, checkpoint.parent, preprocessing, params.export.opset,
                                           params.export.atol, outcome.checkpoint_sha256, prefix)
    if max_abs_diff > params.export.atol:
        raise UserError(f"export.atol: the fine-tuned model's ONNX differs from torch by {max_abs_diff:.3g} > "
                        f"{params.export.atol:g}; the checkpoint {checkpoint} is kept, so a re-run only re-exports")
    with atomic_write(FINETUNE_DIR / finetune_files.STATE_DICT, "wb") as handle:
        torch.save(net.state_dict(), handle)
    best = outcome.history[outcome.best_epoch]
    meta = {
        "arch": backbone.arch, "weights": backbone.weights, "cut": params.backbone.cut, "cut_node": setup.cut_node,
        "pool": params.backbone.pool, "unfreeze": setup.unfreeze, "trainable_blocks": setup.trainable,
        "bn": setup.bn, "init_head": params.finetune.init_head, "classes": classes,
        "preprocessing": preprocessing.to_json(), "best_epoch": outcome.best_epoch,
        "val_accuracy": best["val_accuracy"],
        "head_hidden": [m.out_features for m in net.head.modules() if isinstance(m, torch.nn.Linear)][:-1],
    }
    probabilities = test_probabilities(onnx_model, test, preprocessing, params.extract.providers)
    finetune_files.write_test_scores(test.keys(), probabilities)
    finetune_files.write_meta(meta)  # last: with the sha256 of the files above
    write_curves(outcome.history)
    return max_abs_diff
