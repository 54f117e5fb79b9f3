"""The extract stage's work: manifest + models/backbone.onnx -> feature store -> data/features/{train,val,test}.h5
and the metrics.

Only rows missing from the store (extract.store, not a DVC output) are computed: new images, a backbone or cut
never seen before. Decoding and preprocessing run in `extract.workers` processes while ONNX Runtime runs the
previous batch.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from transfer_learning.backbone import files as backbone_files
from transfer_learning.common.errors import UserError
from transfer_learning.common.hashing import sha256_bytes
from transfer_learning.data import manifest
from transfer_learning.data.images import Preprocessing
from transfer_learning.data.pixels import NormalizeTable
from transfer_learning.data.manifest import SPLITS
from transfer_learning.features import quantize
from transfer_learning.features.fingerprint import about, digest, fingerprint_spec
from transfer_learning.features.runtime import FeatureRunner
from transfer_learning.features.split_files import FEATURES_DIR, SplitRows, write_split
from transfer_learning.features.store import FeatureStore, resolve_store, store_key
from transfer_learning.features.views import ViewRequest, view_id
from transfer_learning.params import ExtractParams

log = logging.getLogger("extract")
# The cut and pooling export made models/backbone.onnx with, for the store folder's description only. Not a DVC dep
# of extract: it also holds export's measured parity, which can change (export.atol, another CPU) without a feature
# changing; a record of another ONNX file (sha256 differs) is not used.
EXPORT_RECORD = Path("metrics/export.json")


def described(spec: dict, backbone: backbone_files.Backbone, source_sha256: str, feature_dim: int) -> dict:
    """What the features' fingerprint stands for, for `python -m stages.store list`: the backbone, and the cut and
    pooling export recorded for this very ONNX file (unknown when its record is of another file)."""
    try:
        exported = json.loads(EXPORT_RECORD.read_text())
    except (OSError, ValueError):
        exported = {}
    if not isinstance(exported, dict) or exported.get("onnx_sha256") != source_sha256:
        exported = {}
    return about(spec, "backbone features", arch=backbone.arch, weights=backbone.weights,
                 cut=exported.get("cut"), cut_node=exported.get("cut_node"), pool=exported.get("pool"),
                 feature_dim=feature_dim)


def compute(store: FeatureStore, todo: dict[str, ViewRequest], runner: FeatureRunner,
            preprocessing: Preprocessing, batch_size: int, workers: int) -> float:
    """Runs the backbone over `todo`, committing to the store as it goes; returns the seconds it took.

    Normalizing stays in this thread, between ONNX Runtime calls: ORT's threads meet at a barrier after every
    operator, so CPU taken from any of them by a concurrent normalizer is lost wall time (benchmarks/README.md,
    "Extract: speed and memory")."""
    from torch.utils.data import DataLoader  # torch (seconds of CPU) only when rows are computed

    from transfer_learning.features.views import ViewDataset, collate, one_thread_worker

    started = time.perf_counter()
    keys = list(todo)
    normalize = NormalizeTable.of(preprocessing)
    loader = DataLoader(ViewDataset(list(todo.values()), preprocessing, grey_planes=True), batch_size=batch_size,
                        num_workers=workers, collate_fn=collate, worker_init_fn=one_thread_worker,
                        prefetch_factor=4 if workers else None)
    batches = iter(loader)  # forks the workers; memory this process writes after a fork is copy-on-write while
    # they live (each page's first write copies it), so the reused input buffer is made after it
    inputs = np.empty((batch_size, 3, preprocessing.crop, preprocessing.crop), np.float32)
    done = 0
    with tqdm(total=len(keys), desc="extract", unit="img", smoothing=0.1) as bar:
        for batch, good, errors in batches:
            batch_keys = keys[done:done + len(good) + len(errors)]
            if good:
                store.add([batch_keys[i] for i in good], runner(normalize(batch.numpy(), inputs)))
            done += len(batch_keys)
            bar.update(len(batch_keys))
            if errors:
                raise UserError(f"cannot extract {len(errors)} image(s): " + "; ".join(errors[:5])
                                + ". Every row computed before is kept in the feature store.")
    return time.perf_counter() - started


def extract(params: ExtractParams) -> dict:
    """Every split's rows from the store, the missing ones computed first; returns metrics/extract.json's dict."""
    started = time.perf_counter()
    rows = manifest.read()
    classes = manifest.read_classes()
    label_index = {label: i for i, label in enumerate(classes)}
    backbone = backbone_files.load()
    # the data's rule for high-bit images is part of the preprocessing, hence of the fingerprint (which also
    # measures what the code and libraries of this process make of the probe images: data/probes.py)
    preprocessing = backbone.preprocessing.with_bit_depth(manifest.read_bit_depth())
    onnx_bytes = backbone_files.ONNX.read_bytes()  # hashed and run from the same bytes: no re-read in between
    source_sha256 = sha256_bytes(onnx_bytes)
    # fp32: the same bytes; int8/fp16: the model cached in <store>/quantized/ (its name goes into the metrics,
    # where `stages.store gc` finds which cached models the repo refers to)
    onnx_bytes, model_file = quantize.backbone_and_file(params, onnx_bytes, rows, preprocessing)
    runner = FeatureRunner(onnx_bytes, params.providers, params.batch_size)
    feature_dim = runner.feature_dim or int(
        runner(np.zeros((1, 3, preprocessing.crop, preprocessing.crop), np.float32)).shape[1])
    spec = fingerprint_spec(sha256_bytes(onnx_bytes), preprocessing, params.dtype, params.precision)
    features_fingerprint = digest(spec)

    per_split: dict[str, SplitRows] = {split: SplitRows([], [], [], []) for split in SPLITS}
    wanted: dict[str, ViewRequest] = {}
    for row in rows:
        views = range(params.augment_views + 1) if row.split == "train" else range(1)
        for view in views:
            key = store_key(row.sha256, view_id(view, preprocessing))
            wanted.setdefault(key, ViewRequest(row.path, row.sha256, view))
            split = per_split[row.split]
            split.keys.append(key)
            split.paths.append(row.path)
            split.labels.append(label_index[row.label])
            split.views.append(view)

    with FeatureStore(resolve_store(params.store), features_fingerprint, feature_dim, params.dtype,
                      about=described(spec, backbone, source_sha256, feature_dim)) as store:
        todo = {key: request for key, request in wanted.items() if key not in store}
        log.info("%d images, %d rows with views: %d reused from the store %s, %d to compute",
                 len(rows), len(wanted), len(wanted) - len(todo), store.dir, len(todo))
        engine: dict = {"engine": params.engine} | ({"actors": params.ray.actors} if params.engine == "ray" else {})
        if todo and params.engine == "ray":
            from transfer_learning.features import ray_engine  # imports Ray (~1.5 s) only when it is used

            seconds, ran = ray_engine.compute(store, todo, onnx_bytes, preprocessing, params)
            engine |= ran
        else:
            seconds = compute(store, todo, runner, preprocessing, params.batch_size, params.workers) if todo else 0.0
        store.commit()
        store.compact()
        for split, split_rows in per_split.items():
            write_split(FEATURES_DIR / f"{split}.h5", split_rows, store.gather(split_rows.keys),
                        fingerprint=features_fingerprint, classes=classes, feature_dim=feature_dim, dtype=params.dtype)
        store_rows, rejected_files = len(store), store.rejected_files

    metrics = {
        "images": len(rows),
        "rows": len(wanted),
        "augment_views": params.augment_views,
        "computed": len(todo),
        "reused": len(wanted) - len(todo),
        "seconds": round(time.perf_counter() - started, 2),
        "compute_seconds": round(seconds, 2),
        "images_per_s": round(len(todo) / seconds, 1) if seconds else None,
        "provider": runner.provider,
        "precision": params.precision,
        **({"quantized_model": model_file.name} if model_file else {}),
        **engine,  # engine, and for ray: actors and the actors' provider
        "fingerprint": features_fingerprint,
        "feature_dim": feature_dim,
        "dtype": params.dtype,
        "store_rows": store_rows,
        "store_files_rejected": rejected_files,
        **({"store_merge_skipped": store.merge_skipped} if store.merge_skipped else {}),  # a full disk, and its need
    }
    log.info("features for %s -> %s (%d computed, %d reused, provider %s)",
             ", ".join(f"{s} {len(r.keys)}" for s, r in per_split.items()), FEATURES_DIR, len(todo),
             len(wanted) - len(todo), runner.provider)
    return metrics
