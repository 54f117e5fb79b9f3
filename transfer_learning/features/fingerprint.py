"""The feature fingerprint: what changes features, hashed. It names the store folder their rows live in, so any
change to it leaves every stored row unserved (and an unchanged fingerprint must mean unchanged features)."""
from __future__ import annotations

import hashlib
import json

# Bump when the code that turns image bytes into model inputs changes (data/images.py, features/views.py): the
# fingerprint then changes, and no feature computed by the old code is served.
PIPELINE_VERSION = 1


def fingerprint(onnx_sha256: str, preprocessing: dict, dtype: str, precision: str = "fp32") -> str:
    """What changes features: the ONNX bytes run (weights, cut, pooling; for int8/fp16 the converted model's own
    bytes, so its calibration too), the preprocessing, the input code, the precision. fp32 adds no key: its
    fingerprints are the ones computed before extract.precision existed."""
    spec_fields = {"onnx": onnx_sha256, "preprocessing": preprocessing, "dtype": dtype, "pipeline": PIPELINE_VERSION}
    if precision != "fp32":
        spec_fields["precision"] = precision
    spec = json.dumps(spec_fields, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()
