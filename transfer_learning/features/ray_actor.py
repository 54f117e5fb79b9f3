"""What runs in Ray's workers for extract.engine: ray (ray_engine.py drives them). Kept apart from the driver's
module so that a worker imports only what it runs: no params, no store, and no torch for the plain view (every
worker process pays its imports before its first row; torch + torchvision cost ~4 s of a 2-core machine). The plain
view is data/pixels.py, bit for bit torchvision's transform; torch is imported only for augmented views, whose
random crops follow torch's generator (views.ViewDataset), at the first batch that has one. So the workers get the
preprocessing as its JSON, not as a data.images.Preprocessing (unpickling that would import torch).

A BackboneActor takes two batches at a time (ActorPoolStrategy max_concurrent_calls_per_actor=2) and runs them as
a two-stage pipeline, one lock per stage: one batch is decoded while ONNX Runtime computes the other, as the local
engine's loader workers decode while it runs the model. One decoding thread per actor, because augmented views
seed torch's global generator; one ONNX Runtime run at a time, on the actor's CPU share.

The rows are stored under the driver's fingerprint, which holds what the driver's libraries make of the probe images
(data/probes.py). A worker on another node decodes with that node's libraries, so each actor and reader process
measures the probes itself when it starts and refuses to compute rows when they differ from the driver's.
"""
from __future__ import annotations

import importlib.metadata
import platform
import threading
import time
from types import SimpleNamespace

import numpy as np

from transfer_learning.common.errors import UserError
from transfer_learning.data.pixels import NormalizeTable, PlainPixels
from transfer_learning.data.probes import probe_digest
from transfer_learning.features.runtime import FeatureRunner

CONCURRENT_BATCHES = 2  # per actor: one decoding, one in ONNX Runtime
DECODING_LIBRARIES = ("Pillow", "numpy", "pypng", "tifffile", "imagecodecs")  # what data/decode.py reads images with


class NodePixelsDiffer(UserError):
    """A Ray worker's libraries make other pixels of the probe images than the driver's: its rows would be stored
    under a fingerprint that does not describe them."""


def decoding_libraries() -> str:
    found = []
    for name in DECODING_LIBRARIES:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


def check_probe_pixels(preprocessing: dict, driver_digest: str) -> None:
    """Raises NodePixelsDiffer unless this process decodes the probe images to the driver's pixels (`driver_digest`:
    its probe_digest of the same preprocessing). Measured once per process (probe_digest caches it)."""
    here = probe_digest(SimpleNamespace(**preprocessing))
    if here != driver_digest:
        raise NodePixelsDiffer(
            f"this Ray node ({platform.node()}) decodes the probe images to other pixels than the driver: its "
            f"libraries differ ({decoding_libraries()}; probe digest {here[:12]}, the driver's {driver_digest[:12]}). "
            "Install the same versions of these libraries as the driver's on every node of extract.ray.address, "
            "or run extract.engine: local")


def augmented_views(paths, sha256s, views, preprocessing: dict) -> list[tuple[np.ndarray | None, str]]:
    """views.ViewDataset's seeded augmentations (torch's generator: imported here, only when there are some)."""
    from transfer_learning.data.images import Preprocessing
    from transfer_learning.features.views import ViewDataset, ViewRequest, one_thread_worker

    one_thread_worker(0)  # decoding: one torch thread beside ONNX Runtime's
    dataset = ViewDataset([ViewRequest(str(p), str(s), int(v)) for p, s, v in zip(paths, sha256s, views)],
                          Preprocessing.from_json(preprocessing))
    return [(None if tensor is None else tensor.numpy(), error or "") for tensor, error in
            (dataset[i] for i in range(len(dataset)))]


def decode_views(batch: dict[str, np.ndarray], preprocessing: dict) -> tuple[np.ndarray, np.ndarray]:
    """The batch's images as uint8 NCHW (zeros where one failed) and the reasons ('' if none). `preprocessing`:
    Preprocessing.to_json()."""
    crop = preprocessing["crop"]
    pixels = np.zeros((len(batch["key"]), 3, crop, crop), np.uint8)
    errors = np.full(len(pixels), "", dtype=object)
    plain = PlainPixels(preprocessing["resize"], crop, preprocessing["interpolation"])
    augmented = np.flatnonzero(np.asarray(batch["view"]) != 0)
    for i in np.flatnonzero(np.asarray(batch["view"]) == 0):
        image, error = plain.read(str(batch["path"][i]), str(batch["sha256"][i]), preprocessing["bit_depth"])
        errors[i] = error or ""
        if image is not None:
            pixels[i] = image
    if len(augmented):
        views = augmented_views(batch["path"][augmented], batch["sha256"][augmented], batch["view"][augmented],
                                preprocessing)
        for i, (image, error) in zip(augmented, views):
            errors[i] = error
            if image is not None:
                pixels[i] = image
    return pixels, errors


def read_views(batch: dict[str, np.ndarray], preprocessing: dict, driver_probe_digest: str) -> dict[str, np.ndarray]:
    """A reader task (extract.ray.decode: tasks): the batch's pixels for the actors. `driver_probe_digest`: the
    driver's, which this node must reproduce (measured at the process's first batch, then cached)."""
    check_probe_pixels(preprocessing, driver_probe_digest)
    pixels, errors = decode_views(batch, preprocessing)
    return {"key": batch["key"], "pixels": pixels, "error": errors}


class BackboneActor:
    """One ONNX Runtime session for the actor's life; a batch of paths (decode: actors) or of uint8 pixels
    (decode: tasks) in, float32 rows out."""

    def __init__(self, onnx, providers: list[str], batch_size: int, preprocessing: dict,
                 feature_dim: int, use_gpu: bool, threads: int, driver_probe_digest: str):
        """`onnx`: the model's bytes, or their object reference; `preprocessing`: Preprocessing.to_json();
        `driver_probe_digest`: the driver's probe digest of that preprocessing, which this node must reproduce."""
        check_probe_pixels(preprocessing, driver_probe_digest)
        if not isinstance(onnx, bytes):
            import ray

            onnx = ray.get(onnx)
        # use_gpu False: CPU even on a GPU node, as extract.ray.num_gpus_per_actor: 0 asks
        self.runner = FeatureRunner(onnx, providers, batch_size, gpu_present=None if use_gpu else False,
                                    threads=threads)
        self.preprocessing = preprocessing
        # extract's own normalization (Preprocessing.normalize): the same bits, no torch
        self.normalize = NormalizeTable(preprocessing["mean"], preprocessing["std"])
        crop = preprocessing["crop"]
        self.inputs = np.empty((batch_size, 3, crop, crop), np.float32)
        self.feature_dim = feature_dim
        self.decoding, self.inferring, self.accounting = threading.Lock(), threading.Lock(), threading.Lock()
        self.last_end = 0.0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        with self.decoding:
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
