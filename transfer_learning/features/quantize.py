"""The backbone at `extract.precision`: fp32 is models/backbone.onnx itself; int8 is an ONNX Runtime static
quantization of it (QDQ, calibrated on a seeded sample of train images, see calibration.py); fp16 is a float16 copy
(float32 in and out) for the CUDA provider.

A converted model is cached under `<extract.store>/quantized/<digest>.onnx`, where <digest> hashes everything that
made it (the ONNX sha256, the precision, the calibration set, method and options). Its own sha256 is written beside
it (`<digest>.onnx.sha256`) and checked before every reuse: a file that fails is moved aside
(`<digest>.onnx.rejected-<ns>`), logged, and rebuilt. Each reuse sets the file's mtime (its last use, which
`python -m stages.store gc` goes by, with the `quantized_model` metrics/extract.json records). Predict goes through
the same function, so it runs the very model the features were made with (the fingerprint hashes the bytes run).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from filelock import FileLock

from transfer_learning.common.atomic import atomic_write, atomic_write_text
from transfer_learning.common.errors import UserError
from transfer_learning.common.hashing import sha256_bytes
from transfer_learning.data.images import Preprocessing
from transfer_learning.data.manifest import Row
from transfer_learning.features.runtime import GPU_PROVIDERS

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "fp16", "int8")
QUANTIZED_DIR = "quantized"
# Per-channel int8 weights with uint8 activations (the pair ORT's x86 kernels run fastest); the first 3 convs stay
# fp32 because the layers nearest the pixels are the ones quantization hurts most. Chosen on val; the recipes
# compared and their figures are in benchmarks/README.md ("int8 features").
INT8_OPTIONS = {"format": "QDQ", "per_channel": True, "activation_type": "QUInt8", "weight_type": "QInt8",
                "reduce_range": False, "fp32_first_convs": 3, "pre_process": True}
FP16_OPTIONS = {"keep_io_types": True}


def check_precision_fits(precision: str, provider: str) -> None:
    """fp16 needs a GPU provider: ONNX Runtime's x86 CPU provider has no float16 convolution kernels, so a float16
    graph runs as float32 behind Cast nodes, slower than fp32 itself."""
    if precision == "fp16" and provider not in GPU_PROVIDERS:
        raise UserError(f"extract.precision: fp16 needs the CUDA provider, and ONNX Runtime runs on {provider} here "
                        "(its x86 CPU kernels have no float16 convolutions: the model would run slower than fp32); "
                        "valid choices on this machine: fp32, int8")


def cache_digest(onnx_sha256: str, precision: str, recipe: dict) -> str:
    spec = json.dumps({"onnx": onnx_sha256, "precision": precision, **recipe}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()


def reusable(path: Path) -> bytes | None:
    """The cached model's bytes if they match the sha256 written beside them; otherwise None, and a damaged or
    unrecorded file is moved aside (and named in the log) so that it is rebuilt."""
    if not path.is_file():
        return None
    record = path.with_name(path.name + ".sha256")
    data = path.read_bytes()
    expected = record.read_text().strip() if record.is_file() else None
    if expected == sha256_bytes(data):
        return data
    aside = path.with_name(f"{path.name}.rejected-{time.time_ns()}")
    path.replace(aside)
    log.warning("%s does not match %s (%s): moved aside to %s, rebuilding it", path, record.name,
                "no sha256 recorded" if expected is None else "damaged or changed since it was written", aside.name)
    return None


def to_int8(onnx_bytes: bytes, sample: list[Row], preprocessing: Preprocessing, method: str,
            options: dict = INT8_OPTIONS) -> bytes:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from transfer_learning.features import calibration

    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        source, prepared, output = Path(tmp, "fp32.onnx"), Path(tmp, "prepared.onnx"), Path(tmp, "int8.onnx")
        source.write_bytes(onnx_bytes)
        # shape inference + fusions first, as ORT's quantization guide advises (better calibration ranges)
        quant_pre_process(str(source), str(prepared))
        nodes = [node.name for node in onnx.load(str(prepared)).graph.node]  # in topological order
        convs = [node.name for node in onnx.load(str(prepared)).graph.node if node.op_type == "Conv"]
        last = options.get("fp32_from_last_convs", 0)  # every node from the last-but-(k-1) conv to the output
        kept = convs[:options["fp32_first_convs"]] + (nodes[nodes.index(convs[-last]):] if last else [])
        quantize_static(str(prepared), str(output), calibration.Reader(sample, preprocessing),
                        quant_format=QuantFormat[options["format"]], per_channel=options["per_channel"],
                        reduce_range=options["reduce_range"],
                        activation_type=QuantType[options["activation_type"]],
                        weight_type=QuantType[options["weight_type"]],
                        nodes_to_exclude=kept, calibrate_method=CalibrationMethod[method],
                        extra_options=dict(options.get("extra_options", {})),
                        calibration_providers=["CPUExecutionProvider"])
        return output.read_bytes()


def to_fp16(onnx_bytes: bytes) -> bytes:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load_from_string(onnx_bytes), **FP16_OPTIONS)
    return model.SerializeToString()


def model_bytes(onnx_bytes: bytes, precision: str, store: Path, rows: list[Row], preprocessing: Preprocessing,
                calibration_images: int, calibration_seed: int, calibration_method: str) -> tuple[bytes, Path | None]:
    """The bytes of the backbone to run at `precision` and the cached file they come from: the ONNX itself (and
    None) for fp32, else the cached (verified) or freshly built conversion."""
    if precision == "fp32":
        return onnx_bytes, None
    if precision not in PRECISIONS:
        raise UserError(f"extract.precision: {precision!r} is not a precision; valid: {', '.join(PRECISIONS)}")
    if precision == "int8":
        from transfer_learning.features import calibration  # onnxruntime.quantization: only when it is used

        sample = calibration.sample(rows, calibration_images, calibration_seed)
        recipe = {"options": INT8_OPTIONS, "method": calibration_method, "seed": calibration_seed,
                  "count": calibration_images, "images": sorted(row.sha256 for row in sample),
                  "preprocessing": preprocessing.to_json(), "pixels": preprocessing.probe_digest()}
    else:
        recipe = {"options": FP16_OPTIONS}
    digest = cache_digest(sha256_bytes(onnx_bytes), precision, recipe)
    path = store / QUANTIZED_DIR / f"{digest}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(path.name + ".lock")):  # one builder; a second run waits, then reuses
        data = reusable(path)
        if data is not None:
            os.utime(path)  # its last use, for gc
            log.info("%s model: reused %s (sha256 checked)", precision, path)
            return data, path
        started = time.perf_counter()
        if precision == "int8":
            data = to_int8(onnx_bytes, sample, preprocessing, calibration_method)
            how = (f"calibrated ({calibration_method}) on {len(sample)} train images, seed {calibration_seed}")
        else:
            data = to_fp16(onnx_bytes)
            how = "converted to float16"
        with atomic_write(path, "wb") as handle:
            handle.write(data)
        atomic_write_text(path.with_name(path.name + ".sha256"), sha256_bytes(data) + "\n")
        log.info("%s model: %s in %.1f s -> %s", precision, how, time.perf_counter() - started, path)
        return data, path


def backbone_at_precision(params, onnx_bytes: bytes, rows: list[Row], preprocessing: Preprocessing) -> bytes:
    """What extract (and predict, for the features its heads were trained on) runs: `params` is ExtractParams."""
    return backbone_and_file(params, onnx_bytes, rows, preprocessing)[0]


def backbone_and_file(params, onnx_bytes: bytes, rows: list[Row], preprocessing: Preprocessing
                      ) -> tuple[bytes, Path | None]:
    """`backbone_at_precision` and the cached file in `<store>/quantized/` it was read from (None for fp32)."""
    from transfer_learning.features.runtime import cuda_device_present, providers_to_try
    from transfer_learning.features.store import resolve_store

    if params.precision != "fp32":
        check_precision_fits(params.precision, providers_to_try(params.providers, cuda_device_present())[0])
    return model_bytes(onnx_bytes, params.precision, resolve_store(params.store), rows, preprocessing,
                       params.calibration_images, params.calibration_seed, params.calibration_method)
