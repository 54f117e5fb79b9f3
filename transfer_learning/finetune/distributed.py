"""A fine-tune rank inside a torchrun worker: the process group (NCCL on CUDA, gloo on the CPU), what the loop
asks of it (sums, a broadcast, a barrier, DDP around the part that trains), and each rank's share of a batch.

The effective batch stays finetune.batch_size: each of the `world` ranks takes batch_size / world images of every
batch (params refuse a batch_size that is not a multiple), and the learning rates stay as they are. Scaling the
learning rate with the number of processes instead would make a 2-process run another experiment than a 1-process
one; this way it is the same one, up to float rounding (BatchNorm in `bn: train` aside: each rank's statistics are
of its own share, there is no SyncBatchNorm on the CPU).
"""
from __future__ import annotations

import ctypes
import datetime
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

# set by the launcher (transfer_learning/finetune/launch.py) for its workers: a worker whose launcher is gone,
# even SIGKILLed, dies with it instead of training on alone and writing the checkpoint of a run restarted since
LAUNCHER_PID = "TRANSFER_LEARNING_FINETUNE_LAUNCHER"
# a dead peer is noticed by torchrun's agents within seconds; this only bounds a collective that waits on a live
# rank, and rank 0 computes nothing long between two (the frozen prefix is cached by the launcher beforehand)
TIMEOUT = datetime.timedelta(minutes=30)
PR_SET_PDEATHSIG = 1


def share_fate_with_launcher() -> None:
    """SIGKILL this process when its parent (torchrun's agent, in the launcher) dies. Linux only."""
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(launcher):  # it died before prctl
        os.kill(os.getpid(), signal.SIGKILL)


class Trainable(nn.Module):
    """What DDP wraps: the tail and the head, the parameters that train. The frozen prefix is not registered (it is
    called through the net's forward): DDP neither broadcasts nor reduces it."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.tail, self.head = net.tail, net.head
        self.net_forward = net.forward

    def forward(self, x: torch.Tensor, from_prefix: bool = False) -> torch.Tensor:
        return self.net_forward(x, from_prefix=from_prefix)


@dataclass(frozen=True)
class Group:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()

    def broadcast(self, value):
        """Rank 0's `value` on every rank (pickled)."""
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def barrier(self) -> None:
        dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def wrap(self, net: nn.Module) -> nn.Module:
        # buffers (BatchNorm statistics) change only in bn: train; then rank 0's are sent to the others each step
        return nn.parallel.DistributedDataParallel(
            Trainable(net), device_ids=[self.device.index] if self.device.type == "cuda" else None,
            forward_sync_buffers=getattr(net, "bn", "frozen") == "train")

    def seed(self, seed: int, epoch: int) -> int:
        return (seed * 1_000_003 + epoch) * 1_009 + self.rank

    def close(self) -> None:
        self.barrier()
        dist.destroy_process_group()


def join() -> Group:
    """This torchrun worker's rank (RANK, WORLD_SIZE, LOCAL_RANK from torchrun): on cuda:<local rank> with NCCL when
    every rank of this machine has a GPU of its own, sharing the GPUs with gloo when there are fewer (NCCL refuses
    two ranks on one GPU), on the CPU with gloo without one."""
    share_fate_with_launcher()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        device = torch.device("cuda", local_rank % gpus)
        torch.cuda.set_device(device)
        if gpus >= int(os.environ["LOCAL_WORLD_SIZE"]):
            dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=TIMEOUT)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return Group(dist.get_rank(), dist.get_world_size(), local_rank, device)


def rank_share(order: list[int], batch_size: int, rank: int, world: int) -> tuple[list[int], list[float], list[int]]:
    """This rank's part of every batch of `order` (batches of batch_size, as one process takes them): positions
    rank, rank + world, ... of each. The last batch's shares are evened out with repeats of weight 0, so every rank
    runs the same steps. Returns (indices, their weights, each batch's size)."""
    mine, weights, sizes = [], [], []
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        share = batch[rank::world]
        pad = -(-len(batch) // world) - len(share)
        mine += share + batch[:1] * pad
        weights += [1.0] * len(share) + [0.0] * pad
        sizes.append(len(batch))
    return mine, weights, sizes
