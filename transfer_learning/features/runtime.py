"""ONNX Runtime sessions for the exported backbone (or fine-tuned model): the providers of `extract.providers` this
machine can have, in the order given; a GPU provider that should come up but does not is an error, not a silent
fall back to CPU."""
from __future__ import annotations

import ctypes
import logging
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from transfer_learning.common.errors import UserError

log = logging.getLogger(__name__)
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# Need an NVIDIA GPU; onnxruntime-gpu lists them in get_available_providers() whether or not there is one.
GPU_PROVIDERS = (CUDA, "TensorrtExecutionProvider", "NvTensorRTRTXExecutionProvider")
# use_tf32=0 (ORT >= 1.17; cuBLAS GEMMs and cuDNN convolutions in fp32) keeps CUDA rows fp32, so they share one
# store key with CPU rows and agree with them to float rounding (tests/test_extract.py states the tolerance).
# The other choice, provider and precision in the fingerprint, would recompute the whole store when a user
# moves between a laptop and a GPU box, for a speed-up that preprocessing on the CPU hides anyway.
# HEURISTIC: no cuDNN benchmarking (EXHAUSTIVE would time every algorithm for each new input shape).
CUDA_OPTIONS = {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}


def cuda_device_present() -> bool:
    """What torch sees. torch finds a device through the NVIDIA driver's library: where that library cannot be
    loaded, torch sees none either, and the answer costs no torch import (seconds of CPU in every extract)."""
    if not cuda_driver_loadable():
        return False
    import torch

    return torch.cuda.is_available()


def cuda_driver_loadable() -> bool:
    if sys.platform == "darwin":  # no CUDA build of torch there
        return False
    try:
        ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:
        return False
    return True


def providers_to_try(requested: list[str], gpu_present: bool) -> list[str]:
    """`requested` in its order, minus the providers this machine cannot have (one INFO line says which):
    GPU providers without a CUDA device, other providers missing from this onnxruntime build. A GPU provider is
    kept when there is a GPU even if the build lacks it, so that `open_session` reports it."""
    available = ort.get_available_providers()
    skipped: dict[str, str] = {}
    for name in requested:
        if name in GPU_PROVIDERS and not gpu_present:
            skipped[name] = "no CUDA device (torch.cuda.is_available() is False)"
        elif name not in available and name not in GPU_PROVIDERS:
            skipped[name] = f"not in this onnxruntime build (it has {', '.join(available)})"
    if skipped:
        log.info("ONNX Runtime: skipping %s", "; ".join(f"{name}: {why}" for name, why in skipped.items()))
    return [name for name in requested if name not in skipped] or [CPU]


def provider_options(name: str) -> tuple[str, dict[str, str]]:
    return name, dict(CUDA_OPTIONS) if name == CUDA else {}


def open_session(model: Path | bytes, requested: list[str], gpu_present: bool | None = None,
                 threads: int = 0) -> ort.InferenceSession:
    """A session on the first provider of `providers_to_try`, or a UserError saying how to fix the install.
    `model`: a path, or the bytes of a file whose digest was just checked (so that the file is not read a second
    time, after the check). `gpu_present` defaults to what torch sees. `threads`: ONNX Runtime's intra-op threads
    (0: one per physical core)."""
    gpu_present = cuda_device_present() if gpu_present is None else gpu_present
    providers = providers_to_try(requested, gpu_present)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # idle ORT threads would spin on cores the preprocessing workers need (measured: ~4 % faster end to end)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    wants_gpu = any(name in GPU_PROVIDERS for name in providers)
    if wants_gpu:
        # Loads CUDA/cuDNN from the nvidia-* pip wheels (torch's) or the system paths before the CUDA provider
        # library is opened: the usual cure when torch's CUDA libraries are not the ones onnxruntime-gpu needs.
        ort.preload_dlls()
        options.use_deterministic_compute = True  # no atomics-based fast reductions: the same row on every run
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, options, providers=[provider_options(p) for p in providers])
    session.disable_fallback()  # an EP failure mid-run raises instead of quietly re-running on CPU
    if session.get_providers()[0] != providers[0]:
        raise UserError(not_up_message(providers[0], session.get_providers()))
    log.info("ONNX Runtime on %s (session providers %s)", session.get_providers()[0], session.get_providers())
    return session


def not_up_message(wanted: str, got: list[str]) -> str:
    from onnxruntime.capi import build_and_package_info as build

    cuda = getattr(build, "cuda_version", "")
    if wanted not in ort.get_available_providers():
        cause = (f"this onnxruntime build ({build.package_name} {ort.__version__}) has no {wanted}: "
                 "`pip install onnxruntime-gpu` (the version in requirements.txt)")
    elif wanted in GPU_PROVIDERS:
        cause = (f"{build.package_name} {ort.__version__} could not load {wanted} even after "
                 f"onnxruntime.preload_dlls(); it needs an NVIDIA driver, CUDA {cuda.split('.')[0] or '?'}.x and "
                 "cuDNN 9.x" + (", and TensorRT's libraries" if wanted != CUDA else "")
                 + " (the ONNX Runtime error above names the missing library). Install them, e.g. "
                 f"`pip install 'onnxruntime-gpu[cuda,cudnn]=={ort.__version__}'` for the pip wheels of both; see "
                 "https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html#requirements")
    else:
        cause = f"{wanted} could not be created (the ONNX Runtime error above says why)"
    gpu = " and torch sees a GPU" if wanted in GPU_PROVIDERS else ""
    return (f"extract.providers asks for {wanted} first{gpu}, but the ONNX Runtime session came up on {got}: "
            f"{cause}. To run on the CPU instead, set extract.providers to [{CPU}].")


class FeatureRunner:
    """Runs batches through the model with `session.run`. On a GPU every batch is padded to `batch_size`: one
    input shape, so cuDNN keeps one algorithm and a row comes out the same whichever batch it falls in (a
    resumed extract equals an uninterrupted one).

    No IOBinding: binding a numpy batch copies pageable memory host->device and output back, exactly what
    `session.run` does. Pinned staging would save a few ms per 64×224² batch (38 MB over PCIe) against the
    hundreds of ms the CPU workers spend decoding and resizing those 64 images: not worth untestable code."""

    def __init__(self, model: Path | bytes, requested: list[str], batch_size: int, gpu_present: bool | None = None,
                 threads: int = 0):
        self.session = open_session(model, requested, gpu_present, threads)
        self.pad_to = batch_size if self.provider != CPU else None
        self.outputs = [o.name for o in self.session.get_outputs()]  # the first is the one returned
        self.input = self.session.get_inputs()[0].name  # backbone.onnx_export.INPUT: not imported, it imports torch
        dim = self.session.get_outputs()[0].shape[1]
        self.feature_dim = dim if isinstance(dim, int) else None

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        if self.pad_to and n < self.pad_to:
            batch = np.concatenate([batch, np.zeros((self.pad_to - n, *batch.shape[1:]), batch.dtype)])
        return self.session.run(self.outputs[:1], {self.input: batch})[0][:n]
