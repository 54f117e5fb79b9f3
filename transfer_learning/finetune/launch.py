"""The finetune stage's work, in this process or, with finetune.nproc x nnodes above 1, data-parallel in torchrun's
workers: launched from this process (torch.distributed.run's API: the stage blocks until they end), rank 0 writing
what one process would, and its metrics returned.

One machine: `--standalone` (a rendezvous on localhost). finetune.nnodes > 1: a static rendezvous at
finetune.rdzv_endpoint (node 0's host:port); node 0 is where `dvc repro` runs the stage (global rank 0 is there,
and writes the outputs); every other node joins with

    python -m transfer_learning.finetune.launch --node-rank <1..nnodes-1>

from its own copy of the project (same params.yaml, data/prepared, models/, images at the manifest's paths).
Before the workers start, the launcher checks the frozen prefix's export against torch and computes its outputs the
store lacks, once per machine: the ranks only compare the export's digest with the one checked, and read the rows. A worker that raises fails the stage with its error; the checkpoint keeps the epochs done.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from transfer_learning.common.errors import UserError, run_main
from transfer_learning.common.hashing import sha256_bytes
from transfer_learning.finetune.distributed import LAUNCHER_PID
from transfer_learning.finetune.prefix import Checked
from transfer_learning.finetune.run import prepare, train
from transfer_learning.params import Params, load_params

log = logging.getLogger("finetune")
WORKER = "transfer_learning.finetune.worker"


def torchrun_args(params: Params, node_rank: int, result: Path, checked_prefix: Path | None = None) -> list[str]:
    settings = params.finetune
    args = ["--nproc-per-node", str(settings.nproc), "--nnodes", str(settings.nnodes), "--max-restarts", "0"]
    if settings.nnodes == 1:
        args.append("--standalone")
    else:
        args += ["--rdzv-backend", "static", "--rdzv-endpoint", settings.rdzv_endpoint, "--node-rank", str(node_rank)]
    args += ["-m", WORKER, "--result", str(result)]
    return args if checked_prefix is None else [*args, "--checked-prefix", str(checked_prefix)]


@contextlib.contextmanager
def worker_environment(nproc: int):
    """The workers' environment: this process's pid (they die with it), and as many threads each as leaves every
    core busy once (torchrun would give them 1) unless OMP_NUM_THREADS is set."""
    saved = {key: os.environ.get(key) for key in (LAUNCHER_PID, "OMP_NUM_THREADS")}
    os.environ[LAUNCHER_PID] = str(os.getpid())
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def cache_prefix_outputs(params: Params, folder: Path) -> Path | None:
    """The frozen prefix's export checked against torch and its outputs for the images the store lacks, here once
    rather than by each rank; the file naming the checked export for the ranks (None: the net has no frozen
    prefix)."""
    prefix = prepare(params, params.finetune.batch_size).prefix
    if prefix is None:
        return None
    checked = folder / "checked_prefix.json"
    checked.write_text(Checked(sha256_bytes(prefix.onnx), prefix.max_abs_diff).to_json())
    return checked


def run_workers(params: Params, node_rank: int, result: Path, checked_prefix: Path | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    settings = params.finetune
    argv = torchrun_args(params, node_rank, result, checked_prefix)
    log.info("finetune.nproc %d x finetune.nnodes %d: torchrun %s", settings.nproc, settings.nnodes, " ".join(argv))
    with worker_environment(settings.nproc):
        try:
            run(parse_args(argv))
        except ChildFailedError as error:
            print(error, file=sys.stderr)  # torchrun's table: every failed rank, its exit code, its error
            rank, failure = error.get_first_failure()
            raise UserError(f"fine-tuning failed in rank {rank} of {settings.nproc * settings.nnodes} (exit code "
                            f"{failure.exitcode}): {root_cause(failure)}; the epochs done so far are in the "
                            "checkpoint: a re-run resumes from it") from None


def root_cause(failure) -> str:
    """The worker's exception, as torchrun's error file recorded it (its last line); the exit code alone when the
    worker died without one (killed, out of memory)."""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    lines = [line for line in str(message or "").splitlines() if line.strip()]
    if not lines or "To enable traceback" in lines[0]:
        return f"no Python error recorded (signal {failure.signal_name()})" if failure.exitcode < 0 else \
            "no Python error recorded"
    return lines[0]


def finetune(params: Params) -> dict:
    """Trains and writes models/finetune/, the curves and the checkpoint; returns metrics/finetune.json's dict."""
    if params.finetune.nproc * params.finetune.nnodes > 1:
        return launch(params)
    return train(params)


def launch(params: Params, node_rank: int = 0) -> dict | None:
    """Runs this node's workers and waits for them; rank 0's metrics on node 0, None on another node."""
    with tempfile.TemporaryDirectory(prefix="finetune-") as folder:
        checked_prefix = cache_prefix_outputs(params, Path(folder))
        result = Path(folder) / "metrics.json"
        run_workers(params, node_rank, result, checked_prefix)
        if node_rank != 0:
            return None
        if not result.is_file():
            raise UserError(f"the torchrun workers ended without rank 0's result ({result})")
        return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description="Join a multi-node fine-tune as node --node-rank (node 0 is the "
                                     "finetune stage itself, run by `dvc repro`).")
    parser.add_argument("--node-rank", type=int, required=True)
    args = parser.parse_args()
    params = load_params(resolve_estimators=False, resolve_backbone=False)
    settings = params.finetune
    if not settings.enabled or settings.nnodes == 1:
        raise UserError("params.yaml: finetune.enabled must be true and finetune.nnodes above 1 to join a "
                        f"multi-node fine-tune (enabled {settings.enabled}, nnodes {settings.nnodes})")
    if not 1 <= args.node_rank < settings.nnodes:
        raise UserError(f"--node-rank {args.node_rank}: valid 1..{settings.nnodes - 1} (finetune.nnodes is "
                        f"{settings.nnodes}; node 0 is the finetune stage)")
    launch(params, args.node_rank)


if __name__ == "__main__":
    run_main(main)
