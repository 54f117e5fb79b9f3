"""The feature fingerprint: what changes features, hashed. It names the store folder their rows live in, so any
change to it leaves every stored row unserved (and an unchanged fingerprint must mean unchanged features).

Beside its rows each folder holds ABOUT, what its fingerprint stands for in words (the backbone, cut, pooling,
precision, dtype, preprocessing) for `python -m stages.store list`. It is for display: no run reads it to decide
what to reuse. It holds the spec the fingerprint hashes, so `list` shows a description only when that spec hashes
to the folder's name."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


ABOUT = "about.json"


def fingerprint_spec(onnx_sha256: str, preprocessing, dtype: str, precision: str = "fp32") -> dict:
    """What changes features: the ONNX bytes run (weights, cut, pooling; for int8/fp16 the converted model's own
    bytes, so its calibration too), the preprocessing (a data.images.Preprocessing) as specified and as measured,
    the dtype, the precision. Measured: the digest of what the code and libraries of this process make of the probe
    images (data/probes.py), so a change of either that changes any probe's pixels changes every fingerprint, and
    one that changes none changes no fingerprint. fp32 adds no precision key."""
    spec = {"onnx": onnx_sha256, "preprocessing": preprocessing.to_json(), "pixels": preprocessing.probe_digest(),
            "dtype": dtype}
    if precision != "fp32":
        spec["precision"] = precision
    return spec


def digest(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def fingerprint(onnx_sha256: str, preprocessing, dtype: str, precision: str = "fp32") -> str:
    return digest(fingerprint_spec(onnx_sha256, preprocessing, dtype, precision))


def about(spec: dict, rows: str, **model) -> dict:
    """ABOUT's content for the folder named digest(spec): `rows` says whose features they are (the backbone's, a
    layer sweep block's, a fine-tune's frozen prefix), `model` what ran (arch, weights, cut, pool, ...)."""
    preprocessing = spec["preprocessing"]
    return {"rows": rows, **model, "precision": spec.get("precision", "fp32"), "dtype": spec["dtype"],
            "input": {key: preprocessing[key] for key in ("resize", "crop", "interpolation", "bit_depth")
                      if key in preprocessing},
            "fingerprint_spec": spec}


def read_about(folder: Path) -> dict | None:
    """The folder's ABOUT when its spec hashes to the folder's name; None when it is missing, unreadable or another
    folder's."""
    try:
        described = json.loads((folder / ABOUT).read_text())
        return described if digest(described["fingerprint_spec"]) == folder.name else None
    except (OSError, ValueError, TypeError, KeyError):
        return None
