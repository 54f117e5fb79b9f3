"""The layer sweep: one ONNX graph with a pooled output per block, run once over every image of the manifest
into the feature store (each block's rows under its own fingerprint: the sweep graph's sha256 and the block's
output name, with the preprocessing and dtype as for extract), then the logistic head per block, its C chosen
on val (heads/selection.py; test rows are stored for a later `backbone.cut: N` run but never read here).
The sweep runs the fp32 graph locally whatever extract.precision and extract.engine say: its rows serve fp32 cuts."""
from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack

import numpy as np
from joblib import Parallel, delayed
from threadpoolctl import threadpool_limits

from transfer_learning.backbone import files as backbone_files
from transfer_learning.common.hashing import sha256_bytes
from transfer_learning.data import manifest
from transfer_learning.features.extract import compute
from transfer_learning.features.fingerprint import about, digest, fingerprint_spec
from transfer_learning.features.split_files import SplitFeatures
from transfer_learning.features.store import FeatureStore, resolve_store, store_key
from transfer_learning.features.views import ViewRequest, view_id
from transfer_learning.heads.files import FittedHead
from transfer_learning.heads.selection import fit_head
from transfer_learning.layers import graph
from transfer_learning.layers.adopt import adopt
from transfer_learning.layers.blocks import SweepBlock, chosen_blocks
from transfer_learning.params import LogisticHead, Params

log = logging.getLogger("layers")
PARALLEL_ABOVE_VALUES = 1_000_000  # train rows x feature dims, summed over blocks (default data: 6 million)


class BlockStores:
    """The stores of every block, fed by `features.extract.compute` as one store: `add` takes the sweep graph's
    outputs (one array per block) and gives each block's store its rows."""

    def __init__(self, stores: list[FeatureStore]):
        self.stores = stores

    def add(self, keys: list[str], outputs: list[np.ndarray]) -> None:
        for store, rows in zip(self.stores, outputs, strict=True):
            new = [i for i, key in enumerate(keys) if key not in store]  # a resumed run: some stores have them
            if new:
                store.add([keys[i] for i in new], rows[new])


def split_features(store: FeatureStore, keys: list[str], labels: list[int], classes: list[str]) -> SplitFeatures:
    features = np.concatenate(list(store.gather(keys))) if keys else np.zeros((0, store.feature_dim), np.float32)
    return SplitFeatures(features.astype(np.float32, copy=False), np.array(labels, dtype=np.int64),
                         np.zeros(len(keys), np.int32), [], classes, store.fingerprint)


def fit_one(name: str, head: LogisticHead, train: SplitFeatures, val: SplitFeatures) -> FittedHead:
    # One BLAS thread: lbfgs on these small matrices is 10-100x slower when OpenBLAS threads contend for busy
    # cores (measured: 58 s -> 1.1 s for one C at load 12 on 2 cores); the blocks run in parallel instead.
    with threadpool_limits(1, user_api="blas"):
        return fit_head(name, head, train, val)


def fit_blocks(head: LogisticHead, data: list[tuple[str, SplitFeatures, SplitFeatures]]) -> list[FittedHead]:
    """Each block's head (fit_head: every C on train, the best on val), one process per core when the work is worth
    starting them (each worker imports torch and scikit-learn: seconds)."""
    jobs = min(len(data), os.cpu_count() or 1)
    if jobs == 1 or sum(train.features.size for _, train, _ in data) < PARALLEL_ABOVE_VALUES:
        return [fit_one(name, head, train, val) for name, train, val in data]
    return Parallel(n_jobs=jobs)(delayed(fit_one)(name, head, train, val) for name, train, val in data)


def to_adopt(adopt_param: str, results: list[dict]) -> list[int]:
    if adopt_param == "none":
        return []
    if adopt_param == "all":
        return [r["block"] for r in results]
    return [max(results, key=lambda r: r["val_accuracy"])["block"]]  # max: the first (shallowest) on a tie


def sweep(params: Params) -> dict:
    """Every chosen block's rows (computed once for all of them, or reused), its head, the adopted blocks;
    returns metrics/layers.json's dict."""
    started = time.perf_counter()
    extract = params.extract
    backbone = backbone_files.load()
    blocks: list[SweepBlock] = chosen_blocks(params.layers.blocks, backbone.anatomy)
    preprocessing = backbone.preprocessing.with_bit_depth(manifest.read_bit_depth())
    onnx_bytes = graph.blocks_onnx(backbone, blocks, params.backbone.pool, params.export.opset)
    export_seconds = time.perf_counter() - started
    runner = graph.BlocksRunner(onnx_bytes, extract.providers, extract.batch_size)
    dims = runner.dims(preprocessing.crop)
    graph_sha256 = sha256_bytes(onnx_bytes)

    rows = manifest.read()
    classes = manifest.read_classes()
    label_index = {label: i for i, label in enumerate(classes)}
    requests = {store_key(row.sha256, view_id(0, preprocessing)): ViewRequest(row.path, row.sha256, 0) for row in rows}
    by_split = {split: ([store_key(r.sha256, view_id(0, preprocessing)) for r in rows if r.split == split],
                        [label_index[r.label] for r in rows if r.split == split]) for split in ("train", "val")}
    root = resolve_store(extract.store)
    head = LogisticHead(type="logistic", C=list(params.layers.C))
    results, adopted = [], {}
    with ExitStack() as stack:
        specs = [fingerprint_spec(f"{graph_sha256}/{block.output}", preprocessing, extract.dtype)
                 for block in blocks]
        stores = [stack.enter_context(FeatureStore(
            root, digest(spec), dim, extract.dtype,
            about=about(spec, "layer sweep block", arch=backbone.arch, weights=backbone.weights, block=block.number,
                        block_name=block.name, node=block.node, pool=params.backbone.pool, feature_dim=dim)))
                  for block, dim, spec in zip(blocks, dims, specs)]
        todo = {key: request for key, request in requests.items() if any(key not in store for store in stores)}
        log.info("%d images x %d blocks: %d images reused from the store %s, %d to compute", len(requests),
                 len(blocks), len(requests) - len(todo), root, len(todo))
        extract_seconds = (compute(BlockStores(stores), todo, runner, preprocessing, extract.batch_size,
                                   extract.workers) if todo else 0.0)
        for store in stores:
            store.commit()
            store.compact()
        heads_started = time.perf_counter()
        fitted_heads = fit_blocks(head, [(f"layers (block {block.number} {block.name})",
                                          *(split_features(store, *by_split[split], classes) for split in
                                            ("train", "val"))) for block, store in zip(blocks, stores)])
        heads_seconds = time.perf_counter() - heads_started
        for block, store, fitted in zip(blocks, stores, fitted_heads):
            results.append({"block": block.number, "name": block.name, "node": block.node,
                            "feature_dim": store.feature_dim, "val_accuracy": round(fitted.val_accuracy, 6),
                            "C": fitted.chosen["C"], "head_seconds": round(fitted.seconds, 2),
                            "fingerprint": store.fingerprint})
            log.info("block %d (%s, %d features): val accuracy %.4f (C=%g)", block.number, block.name,
                     store.feature_dim, fitted.val_accuracy, fitted.chosen["C"])
        adopt_started = time.perf_counter()
        for number in to_adopt(params.layers.adopt, results):
            block = next(b for b in blocks if b.number == number)
            cut = graph.cut_onnx(backbone, block, params.backbone.pool, params.export.opset)
            adopted[str(number)] = adopt(stores[blocks.index(block)], requests, cut, preprocessing, root,
                                         extract.dtype, extract.providers, extract.batch_size,
                                         model={"arch": backbone.arch, "weights": backbone.weights, "cut": number,
                                                "cut_node": block.node, "pool": params.backbone.pool})
    best = max(results, key=lambda r: r["val_accuracy"])
    return {
        "enabled": True,
        "arch": backbone.arch,
        "pool": params.backbone.pool,
        "images": len(requests),
        "computed": len(todo),
        "reused": len(requests) - len(todo),
        "provider": runner.provider,
        "best": {"block": best["block"], "name": best["name"], "val_accuracy": best["val_accuracy"],
                 "feature_dim": best["feature_dim"]},
        "blocks": results,
        "adopted": adopted,
        "seconds": {"export": round(export_seconds, 2), "extract": round(extract_seconds, 2),
                    "heads": round(heads_seconds, 2), "adopt": round(time.perf_counter() - adopt_started, 2),
                    "total": round(time.perf_counter() - started, 2)},
    }
