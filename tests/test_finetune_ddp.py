"""Data-parallel fine-tuning (finetune.nproc > 1): real torchrun workers on the CPU with gloo. Two processes train
the run one process trains (to float rounding), resume it after a SIGKILL of the whole stage, and fail the stage
with a worker's own error; and a skipped stage imports no torch."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO
from tests.faults import faulty_env
from tests.test_finetune import finetuned, heads_trained  # noqa: F401 (fixtures: the frozen prefix's kept export)
from transfer_learning.common.errors import UserError
from transfer_learning.finetune.distributed import rank_share
from transfer_learning.params import load_params

# a fresh head on the last two blocks (the frozen prefix `finetuned` exported), over the prefix's cached outputs: the
# epochs are cheap, the processes' start-up is what is measured
SETTINGS = {"enabled": True, "unfreeze": 2, "init_head": None, "epochs": 3, "batch_size": 8, "patience": 5,
            "augment": {"random_resized_crop": False, "hflip": False, "color_jitter": 0.0}}


def set_finetune(root: Path, **values) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["finetune"] = {**params["finetune"], **values}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_stage(root: Path, **faults: int) -> subprocess.CompletedProcess:
    """`python -m stages.finetune` as DVC runs it, in a session of its own (what a kill of "the stage" kills), with
    `faults` (tests/faults.py) in each of its processes."""
    env = faulty_env(root.parent / "faults", **faults) if faults else {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "stages.finetune"], cwd=root, capture_output=True, text=True,
                          timeout=300, start_new_session=True, env={**env, "TQDM_DISABLE": "1"})


def processes_in(root: Path) -> list[int]:
    """Live processes whose working directory is `root` (the stage, torchrun's agent, the workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if Path(os.readlink(entry / "cwd")) == root and (entry / "stat").read_text().split()[2] != "Z":
                    found.append(int(entry.name))
    return found


def checkpoint_of(root: Path) -> Path:
    [checkpoint] = (root / "store/finetune").glob("*/checkpoint.pt")
    return checkpoint


@pytest.mark.slow
def test_two_processes_resume_after_a_sigkill_fail_with_a_workers_error_and_match_one_process(exported, finetuned,
                                                                                             tmp_path):
    import torch

    from transfer_learning.finetune import run
    from transfer_learning.finetune.loop import fit

    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(exported, two)
    # the frozen prefix's export as the one-process stage kept it (the same prefix node): exporting it is not what is
    # tested here, and its rows are not copied, so the launcher still computes them
    [kept] = (finetuned / "store/finetune").glob("*/prefix.onnx")
    shutil.copytree(kept.parent, two / "store/finetune" / kept.parent.name)
    set_finetune(two, **SETTINGS, nproc=2)
    killed = run_stage(two, kill_after_epoch=1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    deadline = time.monotonic() + 120  # a bound against hanging, not a timing: they die with their launcher
    while processes_in(two) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_in(two) == []
    checkpoint = checkpoint_of(two)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1
    # the frozen prefix's outputs: computed once, by the launcher (train and val images), only read by the ranks
    computed = [int(n) for n in re.findall(r"(\d+) to compute", killed.stderr)]
    assert [n for n in computed if n] == [36, 12] and len(computed) > 2, killed.stderr[-3000:]
    # and its export checked against torch once, by the launcher: rank 0 (which logs) took the bytes it checked
    reused = f"{kept.parent.name}/prefix.onnx: kept export reused (sha256 checked)"
    assert reused in killed.stderr, killed.stderr[-3000:]
    assert "the bytes the launcher checked against torch" in killed.stderr, killed.stderr[-3000:]
    assert "not the file the launcher checked" not in killed.stderr

    failed = run_stage(two, fail_after_epoch=2)  # rank 1 raises once epoch 2 is saved
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert failed.stderr.strip().splitlines()[-1] == (
        "error: fine-tuning failed in rank 1 of 2 (exit code 1): RuntimeError: rank 1 fails on purpose after epoch 2; "
        "the epochs done so far are in the checkpoint: a re-run resumes from it")
    assert "epoch 1 of 3 done" in failed.stderr  # it had resumed
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2  # nothing written is lost

    resumed = run_stage(two)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    together = json.loads((two / "metrics/finetune.json").read_text())
    assert together["resumed_from_epoch"] == 2 and together["processes"] == 2 and together["epochs_run"] == 3
    assert json.loads((two / "models/finetune/meta.json").read_text())["best_epoch"] == together["best_epoch"]

    # one process on the same data and epochs (the loop alone: the stage's outputs are checked above)
    shutil.copytree(exported, one)
    shutil.copytree(two / "store", one / "store", dirs_exist_ok=True)  # the prefix's export and rows (fit gets
    # a checkpoint path of its own: the two-process one is not resumed)
    set_finetune(one, **SETTINGS)
    with contextlib.chdir(one):
        params = load_params(resolve_estimators=False, resolve_backbone=False)
        prepared = run.prepare(params, params.finetune.batch_size)
        alone = fit(prepared.setup.net, prepared.train_inputs, prepared.val_inputs, params.finetune, run.SEED,
                    tmp_path / "alone.pt", run.default_device())
        setup = prepared.setup
        assert run.run_fingerprint(params, setup.unfreeze, setup.bn, setup.head, prepared.train, prepared.val,
                                   prepared.prefix_fp) == \
            together["run_fingerprint"]  # nproc is not in it: either may resume the other's checkpoint
    # the same run up to float rounding: the ranks add their shares in another order than one process does. The run
    # is well conditioned (a fresh head at the default learning rates: the val loss falls smoothly, 2.31 -> 2.08),
    # so the rounding stays rounding (measured 1e-7 relative); fp16 autocast on CUDA has its own. An accuracy may
    # differ by one image whose top two classes are that close.
    rtol = 1e-2 if torch.cuda.is_available() else 1e-3
    one_image = {"train_accuracy": 1 / len(prepared.train), "val_accuracy": 1 / len(prepared.val)}
    best = alone.history[alone.best_epoch]
    assert abs(together["val_accuracy"] - best["val_accuracy"]) <= one_image["val_accuracy"] + 1e-9
    history = torch.load(checkpoint, weights_only=True)["history"]
    assert [r["epoch"] for r in history] == [r["epoch"] for r in alone.history] == [0, 1, 2, 3]
    for curve in ("train_loss", "val_loss"):
        np.testing.assert_allclose([r[curve] or 0 for r in history], [r[curve] or 0 for r in alone.history],
                                   rtol=rtol, err_msg=curve)
    assert alone.history[3]["val_loss"] < alone.history[0]["val_loss"] * (1 - 10 * rtol)  # it trained
    for curve, tolerance in one_image.items():
        np.testing.assert_allclose([r[curve] or 0 for r in history], [r[curve] or 0 for r in alone.history],
                                   rtol=0, atol=tolerance + 1e-9, err_msg=curve)


def test_each_rank_takes_its_share_of_every_batch_and_the_last_one_is_evened_out():
    order = [7, 3, 9, 0, 5, 1, 8, 2, 6, 4, 10]  # 11 images, batches of 4: 4, 4, 3
    shares = [rank_share(order, 4, rank, 2) for rank in (0, 1)]
    for mine, weights, sizes in shares:
        assert sizes == [4, 4, 3] and len(mine) == len(weights) == 6  # 2 images per batch each: the same steps
    (mine0, weights0, _), (mine1, weights1, _) = shares
    for step in range(3):
        batch = order[4 * step:4 * step + 4]
        counted = [i for i, w in zip(mine0[2 * step:2 * step + 2] + mine1[2 * step:2 * step + 2],
                                     weights0[2 * step:2 * step + 2] + weights1[2 * step:2 * step + 2]) if w]
        assert sorted(counted) == sorted(batch)  # together the ranks take the batch one process takes, once each
    assert weights1[-1] == 0.0 and sum(weights0 + weights1) == len(order)


def test_process_counts_are_checked_against_the_batch_and_the_endpoint(project):
    project.params(finetune={"nproc": 3, "batch_size": 8})
    with pytest.raises(UserError, match=r"finetune.batch_size: 8 is not a multiple of the 3 training processes"):
        load_params(resolve_estimators=False, resolve_backbone=False)
    project.params(finetune={"nnodes": 2, "batch_size": 8})
    with pytest.raises(UserError, match=r"finetune.*rdzv_endpoint: nnodes is 2: .*host:port .*not set"):
        load_params(resolve_estimators=False, resolve_backbone=False)
    project.params(finetune={"nproc": 0})
    with pytest.raises(UserError, match=r"finetune.nproc"):
        load_params(resolve_estimators=False, resolve_backbone=False)


def test_multi_node_args_name_node_0_and_this_nodes_rank(project):
    from transfer_learning.finetune.launch import torchrun_args

    project.params(finetune={"nproc": 2, "nnodes": 3, "rdzv_endpoint": "node0:29400", "batch_size": 12})
    args = torchrun_args(load_params(resolve_estimators=False, resolve_backbone=False), 2, Path("r.json"))
    assert " ".join(args) == ("--nproc-per-node 2 --nnodes 3 --max-restarts 0 --rdzv-backend static "
                              "--rdzv-endpoint node0:29400 --node-rank 2 -m transfer_learning.finetune.worker "
                              "--result r.json")


def test_a_skipped_stage_imports_no_torch(project):
    probe = ("import sys; from stages import finetune; finetune.main(); "
             "print(sorted(m for m in ('torch', 'torchvision', 'numpy', 'onnx') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=project.root, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
    assert json.loads((project.root / "metrics/finetune.json").read_text())["skipped"] is True
    assert (project.root / "models/finetune/skipped.json").is_file()
