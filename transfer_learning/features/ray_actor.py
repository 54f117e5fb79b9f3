"""What runs in Ray's workers for extract.engine: ray (ray_engine.py drives them). Kept apart from the driver's
module so that a worker imports only what it runs: no params, no store (every worker process pays its imports).

A BackboneActor takes two batches at a time (ActorPoolStrategy max_concurrent_calls_per_actor=2) and runs them as
a two-stage pipeline, one lock per stage: one batch is decoded while ONNX Runtime computes the other, as the local
engine's loader workers decode while it runs the model. One decoding thread per actor, because augmented views
seed torch's global generator (views.ViewDataset); one ONNX Runtime run at a time, on the actor's CPU share.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np

from transfer_learning.data.images import LookupNormalize, Preprocessing
from transfer_learning.features.runtime import FeatureRunner
from transfer_learning.features.views import ViewDataset, ViewRequest, one_thread_worker

# fault injection for the tests: an actor SIGKILLs itself at its Nth batch if the marker file does not exist yet
# (it creates it first), so exactly one actor dies once, mid-run
KILL_ACTOR_AT_BATCH = "TRANSFER_LEARNING_KILL_ACTOR_AT_BATCH"
KILL_ACTOR_MARKER = "TRANSFER_LEARNING_KILL_ACTOR_MARKER"
CONCURRENT_BATCHES = 2  # per actor: one decoding, one in ONNX Runtime


def decode_views(batch: dict[str, np.ndarray], preprocessing: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """The batch's images as uint8 NCHW (zeros where one failed) and the reasons ('' if none)."""
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
    return pixels, np.array(errors, dtype=object)


def read_views(batch: dict[str, np.ndarray], preprocessing: Preprocessing) -> dict[str, np.ndarray]:
    """A reader task (extract.ray.decode: tasks): the batch's pixels for the actors."""
    one_thread_worker(0)
    pixels, errors = decode_views(batch, preprocessing)
    return {"key": batch["key"], "pixels": pixels, "error": errors}


class BackboneActor:
    """One ONNX Runtime session for the actor's life; a batch of paths (decode: actors) or of uint8 pixels
    (decode: tasks) in, float32 rows out."""

    def __init__(self, onnx, providers: list[str], batch_size: int, preprocessing: Preprocessing,
                 feature_dim: int, use_gpu: bool, threads: int, kill_at_batch: int = 0, kill_marker: str = ""):
        import ray

        one_thread_worker(0)  # decoding: one torch thread beside ONNX Runtime's
        # use_gpu False: CPU even on a GPU node, as extract.ray.num_gpus_per_actor: 0 asks
        self.runner = FeatureRunner(ray.get(onnx), providers, batch_size, gpu_present=None if use_gpu else False,
                                    threads=threads)
        self.preprocessing = preprocessing
        self.normalize = LookupNormalize(preprocessing)  # extract's own normalization: the same bits, no torch
        self.inputs = np.empty((batch_size, 3, preprocessing.crop, preprocessing.crop), np.float32)
        self.feature_dim = feature_dim
        self.decoding, self.inferring, self.accounting = threading.Lock(), threading.Lock(), threading.Lock()
        self.batches = 0
        self.last_end = 0.0
        self.kill_at_batch, self.kill_marker = kill_at_batch, kill_marker

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        with self.decoding:
            self.batches += 1
            if self.batches == self.kill_at_batch and not os.path.exists(self.kill_marker):
                Path(self.kill_marker).touch()
                os.kill(os.getpid(), signal.SIGKILL)
            if "pixels" in batch:
                pixels, errors = batch["pixels"], batch["error"]
            else:
                pixels, errors = decode_views(batch, self.preprocessing)
        good = errors == ""
        features = np.zeros((len(good), self.feature_dim), np.float32)
        if good.any():
            pixels = pixels[good]
            with self.inferring:  # normalizes into the one reused input buffer, then runs
                if len(pixels) > len(self.inputs):
                    self.inputs = np.empty((len(pixels), *self.inputs.shape[1:]), np.float32)
                features[good] = self.runner(self.normalize(pixels, self.inputs))
        with self.accounting:  # the actor's busy time, overlapping batches counted once
            ended = time.perf_counter()
            busy, self.last_end = ended - max(started, self.last_end), ended
        return {"key": batch["key"], "features": features, "error": errors,
                "provider": np.array([self.runner.provider] * len(good), dtype=object),
                "busy_seconds": np.full(len(good), busy / len(good))}  # shared by the batch's rows
