"""The fine-tune loop: two learning rates (head, backbone), AdamW, linear warmup then cosine, early stopping on
the val loss with the best epoch's weights kept, seeded; mixed precision on CUDA.

Epoch 0 is the model before any update (with an init head: the linear probe), and it is a candidate for the best
epoch: fine-tuning never ends worse on val than the head it started from.

After every epoch the whole state (weights, optimizer, schedule, RNG, history, best so far) is written to
`checkpoint` (atomically), then its sha256 beside it (`checkpoint.pt.sha256`); a run that finds both continues
from the last completed epoch. The checkpoint may sit in a store shared with others, so it is trusted only as
far as it is checked: the digest must match, and it is read with `torch.load(weights_only=True)` (tensors and
plain containers, no code). A file that fails either is reported, moved aside (`.rejected-<ns>`) and the run
starts afresh; a disk error while reading it (an OSError with an errno) stops the run and leaves it in place.

With a process group (torchrun, transfer_learning/finetune/distributed.py) every rank draws the same permutation
as one process would and takes its share of each batch of `batch_size`: the same global batches, gradients
averaged over them by DDP, so the same run up to float rounding whatever the number of processes (a run may be
resumed with another one). Rank 0 alone reads and writes the checkpoint; the others get what it read.
"""
from __future__ import annotations

import io
import json
import logging
import math
import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from transfer_learning.common.atomic import atomic_write, atomic_write_text
from transfer_learning.common.hashing import sha256_bytes
from transfer_learning.finetune.distributed import Group, rank_share
from transfer_learning.finetune.model import FineTuneNet
from transfer_learning.params import FinetuneParams

log = logging.getLogger(__name__)
WEIGHT_DECAY = 1.0e-4
WARMUP_FRACTION = 0.1
CHECKPOINT_KEYS = {"net", "optimizer", "schedule", "scaler", "shuffle_rng", "torch_rng", "cuda_rng", "history",
                   "best_epoch", "best_loss", "best_state", "since_best", "epoch", "stopped"}


@dataclass
class Inputs:
    """A split as the loop sees it: `batches(order)` yields model inputs in that order, `from_prefix` says
    whether they are images or the frozen prefix's outputs."""
    batches: Callable[[list[int], int], Iterator[torch.Tensor]]  # (order, epoch) -> inputs
    labels: np.ndarray
    from_prefix: bool


@dataclass
class Outcome:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    resumed_from: int | None = None
    checkpoint_sha256: str | None = None  # of the checkpoint that holds the returned weights


def schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, round(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def evaluate(net: FineTuneNet, inputs: Inputs, device: torch.device, group: Group | None = None
             ) -> tuple[float, float]:
    """(mean loss, accuracy) in eval mode; with a group each rank takes every world-th image and they add up."""
    net.eval()
    loss_sum, correct = 0.0, 0
    order = list(range(len(inputs.labels)) if group is None else range(group.rank, len(inputs.labels), group.world))
    start = 0
    with torch.inference_mode():
        for x in inputs.batches(order, 0):
            y = torch.as_tensor(inputs.labels[order[start:start + len(x)]], device=device)
            start += len(x)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                logits = net(x.to(device), from_prefix=inputs.from_prefix)
            loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum())
    n = len(order)
    if group is not None:
        loss_sum, correct, n = group.sum([loss_sum, correct, n])
    n = max(1, n)
    return loss_sum / n, correct / n


def fit(net: FineTuneNet, train: Inputs, val: Inputs, params: FinetuneParams, seed: int, checkpoint: Path,
        device: torch.device, on_epoch_end: Callable[[int], None] | None = None, group: Group | None = None
        ) -> Outcome:
    """Trains `net` (in one process, or as one rank of `group`: then `train` and `val` give batches of
    batch_size / world images); `on_epoch_end(epoch)` runs once the epoch's checkpoint is on disk."""
    net.to(device)
    head_params, backbone_params = net.parameter_groups()
    groups = [{"params": head_params, "lr": params.lr_head}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": params.lr_backbone})
    optimizer = torch.optim.AdamW(groups, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = -(-len(train.labels) // params.batch_size)
    lr_schedule = schedule(optimizer, params.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    shuffle = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout in the head

    outcome = Outcome()
    best_loss, best_state, since_best, start = math.inf, None, 0, 1
    if group is None:
        saved = _load(checkpoint, net)
    else:  # one rank verifies (and moves aside) the file; the others load what it read
        saved = group.broadcast(_load(checkpoint, net) if group.leader else None)
        if saved is not None and not group.leader:
            net.load_state_dict(saved["net"])
    model = net if group is None else group.wrap(net)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        lr_schedule.load_state_dict(saved["schedule"])
        if saved["scaler"] and scaler.is_enabled():  # a disabled scaler (a CPU run) saves {}
            scaler.load_state_dict(saved["scaler"])
        shuffle.set_state(saved["shuffle_rng"])
        torch.set_rng_state(saved["torch_rng"])
        if device.type == "cuda" and saved["cuda_rng"] is not None:
            for index, state in enumerate(saved["cuda_rng"][:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, index)
        outcome.checkpoint_sha256 = saved["sha256"]
        outcome.history, outcome.best_epoch = saved["history"], saved["best_epoch"]
        best_loss, best_state, since_best = saved["best_loss"], saved["best_state"], saved["since_best"]
        start = saved["epoch"] + 1
        outcome.resumed_from = saved["epoch"]
        log.info("resuming from %s: epoch %d of %d done", checkpoint, saved["epoch"], params.epochs)
        if saved["stopped"]:
            start = params.epochs + 1
    else:
        val_loss, val_accuracy = evaluate(net, val, device, group)
        outcome.history.append({"epoch": 0, "train_loss": None, "train_accuracy": None,
                                "val_loss": val_loss, "val_accuracy": val_accuracy, "seconds": 0.0})
        best_loss, best_state = val_loss, _copy(net)
        log.info("epoch 0 (before any update): val loss %.4f, val accuracy %.4f", val_loss, val_accuracy)

    for epoch in range(start, params.epochs + 1):
        started = time.perf_counter()
        net.train()
        order = torch.randperm(len(train.labels), generator=shuffle).tolist()
        if group is not None:
            order, weights, batch_sizes = rank_share(order, params.batch_size, group.rank, group.world)
            torch.manual_seed(group.seed(seed, epoch))  # dropout: per rank and epoch, so a resumed run draws alike
        loss_sum, correct, seen, counted = 0.0, 0, 0, 0
        with tqdm(total=len(order), desc=f"finetune epoch {epoch}/{params.epochs}", unit="img", leave=False,
                  disable=group is not None and not group.leader) as bar:
            for step, x in enumerate(train.batches(order, epoch)):
                y = torch.as_tensor(train.labels[order[seen:seen + len(x)]], device=device)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, enabled=device.type == "cuda"):
                    logits = model(x.to(device), from_prefix=train.from_prefix)
                    if group is None:
                        loss = nn.functional.cross_entropy(logits.float(), y)
                    else:  # the share's sum over the global batch's size (times world: DDP averages the ranks)
                        w = torch.as_tensor(weights[seen:seen + len(x)], device=device)
                        weighted = nn.functional.cross_entropy(logits.float(), y, reduction="none") * w
                        loss = weighted.sum() * (group.world / batch_sizes[step])
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                lr_schedule.step()
                if group is None:
                    loss_sum += loss.item() * len(y)
                    correct += int((logits.argmax(1) == y).sum())
                    counted += len(y)
                else:
                    loss_sum += weighted.sum().item()
                    correct += int(((logits.argmax(1) == y) * w).sum())
                    counted += int(w.sum())
                seen += len(y)
                bar.update(len(y))
        if group is not None:
            loss_sum, correct, counted = group.sum([loss_sum, correct, counted])
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"the training loss is not finite at epoch {epoch}: lower finetune.lr_head "
                                     f"({params.lr_head}) or finetune.lr_backbone ({params.lr_backbone})")
        val_loss, val_accuracy = evaluate(net, val, device, group)
        record = {"epoch": epoch, "train_loss": loss_sum / counted, "train_accuracy": correct / counted,
                  "val_loss": val_loss, "val_accuracy": val_accuracy,
                  "seconds": round(time.perf_counter() - started, 2)}
        outcome.history.append(record)
        if val_loss < best_loss:
            best_loss, best_state, since_best, outcome.best_epoch = val_loss, _copy(net), 0, epoch
        else:
            since_best += 1
        stopped = since_best >= params.patience
        log.info("epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1f s%s", epoch,
                 record["train_loss"], record["train_accuracy"], val_loss, val_accuracy, record["seconds"],
                 " (best)" if since_best == 0 else "")
        if group is None or group.leader:
            outcome.checkpoint_sha256 = save_checkpoint(checkpoint, {
                "net": net.state_dict(), "optimizer": optimizer.state_dict(), "schedule": lr_schedule.state_dict(),
                "scaler": scaler.state_dict(), "shuffle_rng": shuffle.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                "history": outcome.history, "best_epoch": outcome.best_epoch, "best_loss": best_loss,
                "best_state": best_state, "since_best": since_best, "epoch": epoch, "stopped": stopped,
            }, previous=outcome.checkpoint_sha256)
        if group is not None:
            group.barrier()  # the others wait while rank 0 writes the checkpoint
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        if stopped:
            log.info("early stop: val loss has not improved for %d epoch(s)", params.patience)
            break
    net.load_state_dict(best_state)
    net.eval()
    return outcome


def digest_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + ".sha256")


def _load(path: Path, net: nn.Module) -> dict | None:
    """The checkpoint, verified and loaded into `net` (on its device), plus its "sha256"; None (start afresh)
    when there is none, it fails its check, or it does not fit this network."""
    if not path.is_file():
        return None
    try:
        saved, digest = _read_verified(path)
        shapes = {k: v.shape for k, v in saved["net"].items()}
    except Exception as error:  # whatever is wrong with the file, it is not used...
        if isinstance(error, OSError) and error.errno is not None:
            raise  # ...but a disk that fails to read it (EIO, EACCES) says nothing about the file: keep it
        aside = path.with_name(f"{path.name}.rejected-{time.time_ns()}")
        path.replace(aside)
        digest_path(path).unlink(missing_ok=True)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        log.warning("checkpoint %s rejected: %s; moved aside to %s, training starts afresh", path, reason, aside.name)
        return None
    if shapes != {k: v.shape for k, v in net.state_dict().items()}:  # checked first: a failed load_state_dict
        log.warning("checkpoint %s was written for another network: starting afresh", path)  # copies halfway
        return None
    net.load_state_dict(saved["net"])
    log.info("checkpoint %s verified (sha256 %s…)", path, digest[:12])
    return {**saved, "sha256": digest}


def _read_verified(path: Path) -> tuple[dict, str]:
    data = path.read_bytes()
    digest = sha256_bytes(data)
    recorded = _recorded(path)
    if not recorded:
        raise ValueError(f"no readable digest beside it ({digest_path(path).name})")
    if digest not in (recorded.get("sha256"), recorded.get("previous")):
        raise ValueError(f"its sha256 {digest[:12]}… differs from the one in {digest_path(path).name} "
                         f"({str(recorded.get('sha256'))[:12]}…): damaged or replaced since it was written")
    try:  # RNG states must stay CPU ByteTensors; load_state_dict copies the weights onto the net's device
        saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = str(error).splitlines()
        refused = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")
        raise ValueError(f"it holds more than tensors and plain containers, not unpickled ({refused})") from None
    missing = CHECKPOINT_KEYS - set(saved) if isinstance(saved, dict) else CHECKPOINT_KEYS
    if missing:
        raise ValueError(f"it lacks {sorted(missing)} (written by other code)")
    return saved, digest


def _recorded(path: Path) -> dict:
    """The digest file's content: {"sha256": ..., "previous": ...}; {} when absent or not JSON (a disk read error
    is raised: it says nothing about the files)."""
    try:
        recorded = json.loads(digest_path(path).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _copy(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def save_checkpoint(path: Path, state: dict, previous: str | None = None) -> str:
    """Writes the checkpoint, then its digest (temp files named by this process); returns the digest. While the
    checkpoint is being replaced the digest file also accepts `previous`, the digest of the checkpoint this run
    last loaded or saved (what is on disk): a kill then loses nothing. Not the digest file's own "sha256": after a
    kill in this window that names a checkpoint that never reached the disk, and a second kill would reject the
    good one."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    digest = sha256_bytes(data)
    atomic_write_text(digest_path(path), json.dumps({"sha256": digest, "previous": previous}) + "\n")
    with atomic_write(path, "wb") as handle:
        handle.write(data)
    atomic_write_text(digest_path(path), json.dumps({"sha256": digest}) + "\n")
    return digest
