"""extract.engine: ray — the store's missing rows computed as Ray Data offline batch inference.

    keys the store lacks (path + sha256) -> from_items -> map_batches(BackboneActor, ActorPoolStrategy): one ONNX
    Runtime session per actor, from the ONNX bytes the driver hashed, shipped once through the object store ->
    iter_batches back to the driver -> store.add

Where the images are decoded (read, sha256 checked, decoded, resized/cropped to uint8, exactly views.ViewDataset;
the plain view without torch, ray_actor.py),
extract.ray.decode: in the actors, so that only paths go in and rows come out (CPU actors: the decoding and the
inference share the actor's CPUs anyway, and 150 KB of pixels per image through the object store only cost time),
or in reader tasks (`read_views`) on any CPU of the cluster, whose pixels feed the actors (GPU actors: a GPU
outruns the one decoding thread of its actor many times over).

The driver is the store's only writer, through the same add/commit path and lock as the local engine: same keys,
same fingerprint, same crash safety, so either engine reuses what the other computed. The fingerprint holds the
driver's probe digest (data/probes.py): each actor and reader process checks that its node's libraries make the same
pixels of the probe images before it computes anything (ray_actor.check_probe_pixels).

Faults: an actor that dies (SIGKILL, OOM) is restarted and its batch retried by Ray (max_restarts,
max_task_retries); a row that arrives twice is stored once. A Python error in a task or actor fails the run with
that error. An image that cannot be read or decoded is not an exception in the worker: its reason travels back with
its key, every other row is computed and stored, and the run then fails with the local engine's UserError.
"""
from __future__ import annotations

import logging
import math
import re
import time
import warnings
from pathlib import Path

from tqdm import tqdm

from transfer_learning.common.errors import UserError
from transfer_learning.data.images import Preprocessing
from transfer_learning.features.ray_actor import CONCURRENT_BATCHES, BackboneActor, NodePixelsDiffer, read_views
from transfer_learning.features.ray_cluster import ray_cluster
from transfer_learning.features.store import FeatureStore
from transfer_learning.features.views import ViewRequest
from transfer_learning.params import ExtractParams

log = logging.getLogger("extract")
READER_CPUS = 1.0  # per reader task (decode: tasks)
RETRIES = 3  # per actor and per batch: a crash that repeats every time (a poisoned image, OOM) ends the run
NODE_PIXELS_DIFFER = re.compile(rf"{NodePixelsDiffer.__name__}: (this Ray node .*)")


def node_pixels_differ(error: BaseException) -> NodePixelsDiffer | None:
    """A worker's NodePixelsDiffer as the driver receives it: Ray Data wraps what a task or an actor's constructor
    raised (UserCodeException, ActorDiedError) and keeps only its traceback's text."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, NodePixelsDiffer):
            return error
        if found := NODE_PIXELS_DIFFER.search(str(error)):
            return NodePixelsDiffer(found.group(1))
        error = error.__cause__ or error.__context__
    return None


def worker_errors_shown(batches):
    """`batches`, a node whose libraries make other probe pixels than the driver's raised as the UserError it is,
    not as the Ray exception that carries its text."""
    try:
        yield from batches
    except Exception as error:
        if (differ := node_pixels_differ(error)) is not None:
            raise differ from error
        raise


def gpus_per_actor(setting: float | str, cluster: dict[str, float], actors: int) -> float:
    """extract.ray.num_gpus_per_actor; auto: one GPU per actor when the cluster has enough, a share of one when
    actors outnumber them, none without GPUs."""
    if setting == "auto":
        return min(1.0, cluster.get("GPU", 0.0) / actors)
    return float(setting)


def decode_in_tasks(setting: str, gpus: float) -> bool:
    """extract.ray.decode; auto: reader tasks feed GPU actors, CPU actors decode their own batches."""
    return setting == "tasks" or (setting == "auto" and gpus > 0)


def ort_threads(cpus: float, gpus: float) -> int:
    """A CPU actor's ONNX Runtime threads: its CPU share (several actors of ORT's default one-per-core each would
    fight over the same cores); a GPU actor keeps ORT's default."""
    return 0 if gpus > 0 else max(1, round(cpus))


def check_fits(cluster: dict[str, float], actors: int, cpus: float, gpus: float, readers: bool) -> None:
    """A pool the cluster cannot hold would wait forever: say so instead, naming the keys to change."""
    total_cpus, total_gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    reader_cpus = READER_CPUS if readers else 0.0
    if actors * cpus + reader_cpus > total_cpus + 1e-9:
        readers_too = f" + {READER_CPUS:g} CPU for the reader tasks (decode: tasks)" if readers else ""
        raise UserError(
            f"extract.ray: {actors} actors x num_cpus_per_actor {cpus:g}{readers_too} needs "
            f"{actors * cpus + reader_cpus:g} CPUs, the cluster has {total_cpus:g}; the run would wait forever. "
            "Lower extract.ray.actors or extract.ray.num_cpus_per_actor (fractions such as 0.5 are fine)")
    if actors * gpus > total_gpus + 1e-9:
        raise UserError(f"extract.ray: {actors} actors x num_gpus_per_actor {gpus:g} needs {actors * gpus:g} GPUs, "
                        f"the cluster has {total_gpus:g}; lower extract.ray.actors or "
                        "extract.ray.num_gpus_per_actor (0 = CPU actors)")


def compute(store: FeatureStore, todo: dict[str, ViewRequest], onnx_bytes: bytes, preprocessing: Preprocessing,
            params: ExtractParams) -> tuple[float, dict]:
    """Runs the backbone over `todo` on Ray, committing to the store as rows arrive; returns the seconds it took
    (Ray's start-up included) and what metrics/extract.json should say about the engine."""
    started = time.perf_counter()  # Ray's imports and start-up included
    import ray
    import ray.data

    settings = params.ray
    with ray_cluster(settings.address) as cluster:
        connected_at = time.perf_counter() - started
        gpus = gpus_per_actor(settings.num_gpus_per_actor, cluster, settings.actors)
        readers = decode_in_tasks(settings.decode, gpus)
        check_fits(cluster, settings.actors, settings.num_cpus_per_actor, gpus, readers)
        log.info("engine ray: %d actors x (%g CPU, %g GPU) on a cluster of %g CPUs, %g GPUs, decoding in %s; "
                 "%d rows to compute", settings.actors, settings.num_cpus_per_actor, gpus, cluster.get("CPU", 0),
                 cluster.get("GPU", 0), "reader tasks" if readers else "the actors", len(todo))
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver's tqdm bar is the one progress bar
        context.print_on_execution_start = False
        # absolute: a worker's working directory is not the project's (and on another node, the same path must
        # reach the same file: a shared filesystem)
        items = [{"key": key, "path": str(Path.cwd() / r.path), "sha256": r.sha256, "view": r.view}
                 for key, r in todo.items()]
        dataset = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / settings.batch_size))
        if readers:
            dataset = dataset.map_batches(
                read_views, batch_size=settings.batch_size, batch_format="numpy", num_cpus=READER_CPUS,
                fn_kwargs={"preprocessing": preprocessing.to_json(),
                           "driver_probe_digest": preprocessing.probe_digest()})
        with warnings.catch_warnings():  # max_restarts & co. as ray_remote_args: deprecated in 2.60, no other way
            warnings.simplefilter("ignore", DeprecationWarning)
            dataset = dataset.map_batches(
                BackboneActor, batch_size=settings.batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=settings.actors, enable_true_multi_threading=True,
                                                   max_concurrent_calls_per_actor=CONCURRENT_BATCHES),
                num_cpus=settings.num_cpus_per_actor, num_gpus=gpus,
                max_restarts=RETRIES, max_task_retries=RETRIES,
                fn_constructor_kwargs=dict(
                    onnx=ray.put(onnx_bytes), providers=params.providers, batch_size=settings.batch_size,
                    preprocessing=preprocessing.to_json(), feature_dim=store.feature_dim, use_gpu=gpus > 0,
                    threads=ort_threads(settings.num_cpus_per_actor, gpus),
                    driver_probe_digest=preprocessing.probe_digest()))
        stored: set[str] = set()
        errors: list[str] = []
        providers: set[str] = set()
        first_rows_at = None  # seconds from the start to the first rows back: Ray's start-up, actors' included
        busy = 0.0
        with tqdm(total=len(todo), desc="extract (ray)", unit="img", smoothing=0.1) as bar:
            for batch in worker_errors_shown(dataset.iter_batches(batch_size=None, batch_format="numpy")):
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
        last_rows_at = time.perf_counter() - started
    seconds = time.perf_counter() - started
    if first_rows_at:
        log.info("Ray: connected in %.1f s, first rows at %.1f s, then %.0f rows/s; shut down in %.1f s",
                 connected_at, first_rows_at, len(todo) / max(last_rows_at - first_rows_at, 1e-3),
                 seconds - last_rows_at)
    if errors:
        raise UserError(f"cannot extract {len(errors)} image(s): " + "; ".join(errors[:5])
                        + ". Every row computed before is kept in the feature store.")
    # what scaling estimates need: the fixed cost, and the rows/s one actor delivers while it works
    return seconds, {
        "actors": settings.actors, "provider": ", ".join(sorted(providers)),
        "ray_startup_seconds": round(first_rows_at, 2) if first_rows_at else None,
        "rows_per_s_per_actor": round(len(stored) / busy, 1) if busy else None}
