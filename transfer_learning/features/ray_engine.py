"""extract.engine: ray — the store's missing rows computed as Ray Data offline batch inference.

    keys the store lacks -> from_items -> read_views (Ray tasks: read, check sha256, decode, resize/crop to uint8,
    exactly views.ViewDataset) -> BackboneActor pool (one ONNX Runtime session per actor, from the ONNX bytes the
    driver hashed, shipped once through the object store) -> iter_batches back to the driver -> store.add

The driver is the store's only writer, through the same add/commit path and lock as the local engine: same keys,
same fingerprint, same crash safety, so either engine reuses what the other computed.

Faults: an actor that dies (SIGKILL, OOM) is restarted and its batch retried by Ray (max_restarts,
max_task_retries); a row that arrives twice is stored once. A Python error in a task or actor fails the run with
that error. An image that cannot be read or decoded is not an exception in the worker: its reason travels back with
its key, every other row is computed and stored, and the run then fails with the local engine's UserError.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from transfer_learning.common.errors import UserError
from transfer_learning.data.images import LookupNormalize, Preprocessing
from transfer_learning.features.ray_cluster import ray_cluster
from transfer_learning.features.runtime import FeatureRunner
from transfer_learning.features.store import FeatureStore
from transfer_learning.features.views import ViewDataset, ViewRequest, one_thread_worker
from transfer_learning.params import ExtractParams

log = logging.getLogger("extract")
# fault injection for the tests: an actor SIGKILLs itself at its Nth batch if the marker file does not exist yet
# (it creates it first), so exactly one actor dies once, mid-run
KILL_ACTOR_AT_BATCH = "TRANSFER_LEARNING_KILL_ACTOR_AT_BATCH"
KILL_ACTOR_MARKER = "TRANSFER_LEARNING_KILL_ACTOR_MARKER"
READER_CPUS = 1.0
RETRIES = 3  # per actor and per batch: a crash that repeats every time (a poisoned image, OOM) ends the run


def read_views(batch: dict[str, np.ndarray], preprocessing: Preprocessing) -> dict[str, np.ndarray]:
    """A Ray task: the batch's images as uint8 NCHW (zeros where one failed) and the reasons ('' if none)."""
    one_thread_worker(0)
    requests = [ViewRequest(str(path), str(sha256), int(view))
                for path, sha256, view in zip(batch["path"], batch["sha256"], batch["view"])]
    dataset = ViewDataset(requests, preprocessing)
    pixels = np.zeros((len(requests), 3, preprocessing.crop, preprocessing.crop), np.uint8)
    errors = []
    for i in range(len(requests)):
        tensor, error = dataset[i]
        if error is None:
            pixels[i] = tensor.numpy()
        errors.append(error or "")
    return {"key": batch["key"], "pixels": pixels, "error": np.array(errors, dtype=object)}


class BackboneActor:
    """One ONNX Runtime session for the actor's life; uint8 batches in, float32 rows out."""

    def __init__(self, onnx, providers: list[str], batch_size: int, preprocessing: Preprocessing,
                 feature_dim: int, use_gpu: bool, kill_at_batch: int = 0, kill_marker: str = ""):
        import ray

        # use_gpu False: CPU even on a GPU node, as extract.ray.num_gpus_per_actor: 0 asks
        self.runner = FeatureRunner(ray.get(onnx), providers, batch_size, gpu_present=None if use_gpu else False)
        self.normalize = LookupNormalize(preprocessing)  # extract's own normalization: the same bits, no torch
        self.inputs = np.empty((batch_size, 3, preprocessing.crop, preprocessing.crop), np.float32)
        self.feature_dim = feature_dim
        self.batches = 0
        self.kill_at_batch, self.kill_marker = kill_at_batch, kill_marker

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.batches += 1
        if self.batches == self.kill_at_batch and not os.path.exists(self.kill_marker):
            Path(self.kill_marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        started = time.perf_counter()
        good = batch["error"] == ""
        features = np.zeros((len(good), self.feature_dim), np.float32)
        if good.any():
            pixels = batch["pixels"][good]
            if len(pixels) > len(self.inputs):
                self.inputs = np.empty((len(pixels), *self.inputs.shape[1:]), np.float32)
            features[good] = self.runner(self.normalize(pixels, self.inputs))
        busy = time.perf_counter() - started
        return {"key": batch["key"], "features": features, "error": batch["error"],
                "provider": np.array([self.runner.provider] * len(good), dtype=object),
                "busy_seconds": np.full(len(good), busy / len(good))}  # this actor's time, shared by its rows


def gpus_per_actor(setting: float | str, cluster: dict[str, float]) -> float:
    """extract.ray.num_gpus_per_actor; auto: one GPU per actor when the cluster has any, else none."""
    if setting == "auto":
        return 1.0 if cluster.get("GPU", 0) > 0 else 0.0
    return float(setting)


def check_fits(cluster: dict[str, float], actors: int, cpus: float, gpus: float) -> None:
    """A pool the cluster cannot hold would wait forever: say so instead, naming the keys to change."""
    total_cpus, total_gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if actors * cpus + READER_CPUS > total_cpus + 1e-9:
        raise UserError(
            f"extract.ray: {actors} actors x num_cpus_per_actor {cpus:g} + {READER_CPUS:g} CPU for the image "
            f"readers needs {actors * cpus + READER_CPUS:g} CPUs, the cluster has {total_cpus:g}; with fewer "
            "the readers never get a CPU and the run waits forever. Lower extract.ray.actors or "
            "extract.ray.num_cpus_per_actor (fractions such as 0.5 are fine)")
    if actors * gpus > total_gpus + 1e-9:
        raise UserError(f"extract.ray: {actors} actors x num_gpus_per_actor {gpus:g} needs {actors * gpus:g} GPUs, "
                        f"the cluster has {total_gpus:g}; lower extract.ray.actors or "
                        "extract.ray.num_gpus_per_actor (0 = CPU actors)")


def compute(store: FeatureStore, todo: dict[str, ViewRequest], onnx_bytes: bytes, preprocessing: Preprocessing,
            params: ExtractParams) -> tuple[float, dict]:
    """Runs the backbone over `todo` on Ray, committing to the store as rows arrive; returns the seconds it took
    (Ray's start-up included) and what metrics/extract.json should say about the engine."""
    import ray
    import ray.data

    started = time.perf_counter()
    settings = params.ray
    with ray_cluster(settings.address) as cluster:
        gpus = gpus_per_actor(settings.num_gpus_per_actor, cluster)
        check_fits(cluster, settings.actors, settings.num_cpus_per_actor, gpus)
        log.info("engine ray: %d actors x (%g CPU, %g GPU) on a cluster of %g CPUs, %g GPUs; %d rows to compute",
                 settings.actors, settings.num_cpus_per_actor, gpus, cluster.get("CPU", 0), cluster.get("GPU", 0),
                 len(todo))
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver's tqdm bar is the one progress bar
        context.print_on_execution_start = False
        # absolute: a worker's working directory is not the project's (and on another node, the same path must
        # reach the same file: a shared filesystem)
        items = [{"key": key, "path": str(Path.cwd() / r.path), "sha256": r.sha256, "view": r.view}
                 for key, r in todo.items()]
        dataset = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / settings.batch_size))
        dataset = dataset.map_batches(
            read_views, batch_size=settings.batch_size, batch_format="numpy", num_cpus=READER_CPUS,
            fn_kwargs={"preprocessing": preprocessing})
        with warnings.catch_warnings():  # max_restarts & co. as ray_remote_args: deprecated in 2.60, no other way
            warnings.simplefilter("ignore", DeprecationWarning)
            dataset = dataset.map_batches(
                BackboneActor, batch_size=settings.batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=settings.actors),
                num_cpus=settings.num_cpus_per_actor, num_gpus=gpus,
                max_restarts=RETRIES, max_task_retries=RETRIES,
                fn_constructor_kwargs=dict(
                    onnx=ray.put(onnx_bytes), providers=params.providers, batch_size=settings.batch_size,
                    preprocessing=preprocessing, feature_dim=store.feature_dim, use_gpu=gpus > 0,
                    kill_at_batch=int(os.environ.get(KILL_ACTOR_AT_BATCH, 0)),
                    kill_marker=os.environ.get(KILL_ACTOR_MARKER, "")))
        stored: set[str] = set()
        errors: list[str] = []
        providers: set[str] = set()
        first_rows_at = None  # seconds from the start to the first rows back: Ray's start-up, actors' included
        busy = 0.0
        with tqdm(total=len(todo), desc="extract (ray)", unit="img", smoothing=0.1) as bar:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                good = [i for i, (key, error) in enumerate(zip(batch["key"], batch["error"]))
                        if not error and key not in stored]
                if good:
                    keys = [str(batch["key"][i]) for i in good]
                    store.add(keys, batch["features"][good])
                    stored.update(keys)
                errors += [str(error) for error in batch["error"] if error]
                providers.update(str(p) for p in batch["provider"])
                bar.update(len(batch["key"]))
                first_rows_at = first_rows_at or time.perf_counter() - started
                busy += float(batch["busy_seconds"].sum())
    if errors:
        raise UserError(f"cannot extract {len(errors)} image(s): " + "; ".join(errors[:5])
                        + ". Every row computed before is kept in the feature store.")
    # what scaling estimates need: the fixed cost, and the rows/s one actor delivers while it works
    return time.perf_counter() - started, {
        "actors": settings.actors, "provider": ", ".join(sorted(providers)),
        "ray_startup_seconds": round(first_rows_at, 2) if first_rows_at else None,
        "rows_per_s_per_actor": round(len(stored) / busy, 1) if busy else None}
