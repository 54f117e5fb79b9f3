"""Faults the crash tests put into the product at known points: a SIGKILL right after the feature store's Nth
commit, a SIGKILL of the whole fine-tune stage or a rank's error once an epoch's checkpoint is on disk, a Ray actor
that SIGKILLs itself once. The product knows nothing of them: they wrap what it already exposes (FeatureStore's
commit and commit_rows, the `on_epoch_end` callback of finetune.loop.fit, the actor class ray_engine runs).

The stages under test run as other processes (the stage itself, torchrun's workers, Ray's workers), so the faults
travel as a `sitecustomize.py` that `faulty_env` writes into a folder put first on the subprocess's PYTHONPATH:
every Python process started from it runs that file, which patches a product module once it is imported (a process
that never imports it pays nothing). Kept free of heavy imports: it runs in every one of those processes.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def faulty_env(folder: Path, **faults: int) -> dict[str, str]:
    """os.environ for a subprocess whose Python processes run with `faults` (the keyword arguments of `install`).
    Each set of faults gets a folder of its own: a sitecustomize.py rewritten in place could be shadowed by the
    bytecode Python cached for the previous one (same size, same second)."""
    folder = folder / "-".join(f"{name}-{value}" for name, value in sorted(faults.items()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(f"from tests.faults import install\ninstall(**{faults!r})\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(REPO)])}


def install(kill_after_commits: int = 0, commit_rows: int = 0, kill_after_epoch: int = 0,
            fail_after_epoch: int = 0) -> None:
    """In this process: the store commits every `commit_rows` rows and the process SIGKILLs itself right after its
    `kill_after_commits`th commit; once the checkpoint of epoch `kill_after_epoch` is on disk, rank 0 (or the one
    process) SIGKILLs the whole stage; once that of epoch `fail_after_epoch` is, the last rank raises."""
    if kill_after_commits or commit_rows:
        after_import("transfer_learning.features.store",
                     lambda module: store_faults(module.FeatureStore, kill_after_commits, commit_rows))
    if kill_after_epoch or fail_after_epoch:
        after_import("transfer_learning.finetune.run",
                     lambda module: epoch_faults(module, kill_after_epoch, fail_after_epoch))


class AfterImport(importlib.abc.MetaPathFinder):
    """Runs `patch(module)` right after the module `name` is first executed."""

    def __init__(self, name: str, patch: Callable[[ModuleType], None]):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        execute, patch = spec.loader.exec_module, self.patch

        def exec_module(module: ModuleType) -> None:
            execute(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def after_import(name: str, patch: Callable[[ModuleType], None]) -> None:
    if name in sys.modules:
        patch(sys.modules[name])
    else:
        sys.meta_path.insert(0, AfterImport(name, patch))


def store_faults(store_class: type, kill_after_commits: int, commit_rows: int) -> None:
    initialize, commit = store_class.__init__, store_class.commit
    commits = 0

    def init(self, *args, **kwargs) -> None:
        initialize(self, *args, **kwargs)
        if commit_rows:
            self.commit_rows = commit_rows

    def commit_then_maybe_die(self) -> None:
        nonlocal commits
        writes = bool(self.pending_keys)  # a commit with nothing pending writes no file
        commit(self)
        commits += writes
        if writes and commits == kill_after_commits:
            os.kill(os.getpid(), signal.SIGKILL)

    store_class.__init__, store_class.commit = init, commit_then_maybe_die


def epoch_faults(run: ModuleType, kill_after_epoch: int, fail_after_epoch: int) -> None:
    """Wraps the `fit` that finetune.run.train calls, adding an `on_epoch_end` that knows the rank. A killed rank 0
    SIGKILLs the launcher's process group, then itself (a torchrun worker has a session of its own; the other ranks
    die with their launcher)."""
    from transfer_learning.finetune.distributed import LAUNCHER_PID

    fit = run.fit

    def faulty_fit(*args, on_epoch_end=None, group=None, **kwargs):
        rank, world = (0, 1) if group is None else (group.rank, group.world)

        def at_epoch_end(epoch: int) -> None:
            if on_epoch_end is not None:
                on_epoch_end(epoch)
            if epoch == fail_after_epoch and rank == world - 1:
                raise RuntimeError(f"rank {rank} fails on purpose after epoch {epoch}")
            if epoch == kill_after_epoch and rank == 0:
                os.killpg(os.getpgid(int(os.environ.get(LAUNCHER_PID, os.getpid()))), signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)

        return fit(*args, on_epoch_end=at_epoch_end, group=group, **kwargs)

    run.fit = faulty_fit


def actor_killed_once(at_batch: int, marker: Path) -> type:
    """A BackboneActor that SIGKILLs itself at its `at_batch`th batch unless `marker` exists (it creates it first),
    so that exactly one actor of the pool dies once, mid-run. Defined in a function, so Ray ships the class by
    value to its workers: they need not import this module."""
    from transfer_learning.features.ray_actor import BackboneActor

    class ActorKilledOnce(BackboneActor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.batches, self.counting = 0, threading.Lock()

        def __call__(self, batch):
            with self.counting:
                self.batches += 1
                if self.batches == at_batch and not marker.exists():
                    marker.touch()
                    os.kill(os.getpid(), signal.SIGKILL)
            return super().__call__(batch)

    return ActorKilledOnce
