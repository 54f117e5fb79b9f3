"""Adoption: a swept block's rows stored under the fingerprint of the ordinary `backbone.cut: N` export too, so
that a later pipeline run with that cut computes nothing for these images.

The sweep graph and the cut-N graph compute the same block output with the same pooling, but they are different
ONNX files, so their rows are not assumed equal: a seeded sample of the rows is run through the cut-N export
(ONNX Runtime, the sweep's provider) first, and the rows are adopted only if every sampled value agrees within
ADOPT_RTOL of the rows' largest magnitude (measured on CPU: bit-identical, difference 0). Otherwise nothing is
adopted and the log says so: the cut-N run then computes its own rows."""
from __future__ import annotations

import logging

import numpy as np

from transfer_learning.common.errors import UserError
from transfer_learning.common.hashing import sha256_bytes
from transfer_learning.data.images import Preprocessing
from transfer_learning.data.pixels import NormalizeTable
from transfer_learning.features.fingerprint import about, digest, fingerprint_spec
from transfer_learning.features.runtime import FeatureRunner
from transfer_learning.features.store import FeatureStore
from transfer_learning.features.views import ViewDataset, ViewRequest

log = logging.getLogger(__name__)
ADOPT_RTOL = 1e-5
VERIFY_ROWS = 32
CHUNK = 4096


def verify_sample(source: FeatureStore, requests: dict[str, ViewRequest], runner: FeatureRunner,
                  preprocessing: Preprocessing) -> float:
    """max |cut-N export - stored row| over a seeded sample, relative to the rows' largest magnitude (at least 1)."""
    keys = sorted(requests)
    chosen = sorted(np.random.default_rng(0).choice(len(keys), min(VERIFY_ROWS, len(keys)), replace=False))
    sample = [keys[i] for i in chosen]
    items = ViewDataset([requests[k] for k in sample], preprocessing)
    images = []
    for i in range(len(items)):
        image, error = items[i]
        if error is not None:
            raise UserError(f"cannot check the rows to adopt: {error}")
        images.append(image.numpy())
    computed = runner(NormalizeTable.of(preprocessing).inputs(images))
    stored = next(source.gather(sample))
    return float(np.abs(computed - stored).max() / max(1.0, float(np.abs(stored).max())))


def adopt(source: FeatureStore, requests: dict[str, ViewRequest], cut_onnx: bytes, preprocessing: Preprocessing,
          store_root, dtype: str, providers: list[str], batch_size: int, model: dict) -> dict:
    """Copies `source`'s rows of `requests` into the store of the cut export `cut_onnx`, after the sample check.
    `model` says what the export is (arch, weights, cut, cut_node, pool), for the store folder's description."""
    spec = fingerprint_spec(sha256_bytes(cut_onnx), preprocessing, dtype)
    target_fingerprint = digest(spec)
    with FeatureStore(store_root, target_fingerprint, source.feature_dim, dtype,
                      about=about(spec, "backbone features", **model, feature_dim=source.feature_dim)) as target:
        missing = [key for key in requests if key not in target]
        record = {"fingerprint": target_fingerprint, "adopted": 0, "already_there": len(requests) - len(missing)}
        if not missing:
            log.info("store %s already holds all %d rows", target.dir, len(requests))
            return record
        runner = FeatureRunner(cut_onnx, providers, batch_size)
        difference = verify_sample(source, {k: requests[k] for k in missing}, runner, preprocessing)
        record["verified_rows"] = min(VERIFY_ROWS, len(missing))
        record["max_rel_diff"] = difference
        if difference > ADOPT_RTOL:
            log.warning("not adopting into %s: the cut export differs from the sweep rows by %.3g of their scale "
                        "(> %g); a run with this cut computes its own rows", target.dir, difference, ADOPT_RTOL)
            return record
        for start in range(0, len(missing), CHUNK):
            part = missing[start:start + CHUNK]
            target.add(part, next(source.gather(part, chunk=CHUNK)))
        target.commit()
        target.compact()
        record["adopted"] = len(missing)
        log.info("adopted %d rows into %s (sample of %d checked against the cut export: max diff %.3g of scale)",
                 len(missing), target.dir, record["verified_rows"], difference)
        return record
