"""Fingerprints and store keys are byte-for-byte stable: existing feature stores, cached prefix outputs and fine-tune
checkpoints stay valid only while the same inputs give the same digests. The digests below were computed by the
code before the package layout changed; a change here orphans every user's store."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from transfer_learning.backbone import files as backbone_files
from transfer_learning.data import manifest
from transfer_learning.data.images import Preprocessing
from transfer_learning.features.fingerprint import fingerprint
from transfer_learning.features.store import store_key
from transfer_learning.features.views import ViewRequest, view_id
from transfer_learning.finetune.data import LabelledImages
from transfer_learning.finetune.prefix import prefix_fingerprint
from transfer_learning.finetune.run import run_fingerprint
from transfer_learning.heads.files import Head
from transfer_learning.params import load_params

PREPROCESSING = Preprocessing(resize=232, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                              interpolation="bilinear", antialias=True, bit_depth=12)
SHA_A = "a" * 64
SHA_B = "0123456789abcdef" * 4

EXTRACT = "eb4dee7bed6218c4d5b5f54eae165389d98ea94f60df529e964c63bab1842e9c"
PLAIN_KEY = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef/0"
AUGMENTED_KEY = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef/aug-33bc1dc4-3"
RUN = "0180591af8fbe6c2c298df3cc940351c045e5fa998907914ea2aee7fea32eb11"
RUN_FRESH_HEAD = "db7c295645170680fa10df4c61333c9eb61c380e657c66b555f69ff3a04ab8e1"


def test_extract_feature_fingerprint():
    assert fingerprint(SHA_A, PREPROCESSING.to_json(), "float32") == EXTRACT
    assert fingerprint(SHA_A, PREPROCESSING.to_json(), "float32", "fp32") == EXTRACT


EXTRACT_INT8 = "2102a2246f1b52deffafd518fd87b4dc34b1d818f55731382965000b9e3246a8"
EXTRACT_FP16 = "6c6fc7c939603cff740b23d01b4851714315dd3cb1cb1426ef04009139ea14aa"


def test_extract_feature_fingerprint_at_reduced_precision():
    """SHA_A stands for the converted model's sha256 (the bytes run), as extract passes it."""
    assert fingerprint(SHA_A, PREPROCESSING.to_json(), "float32", "int8") == EXTRACT_INT8
    assert fingerprint(SHA_A, PREPROCESSING.to_json(), "float32", "fp16") == EXTRACT_FP16


def test_finetune_prefix_fingerprint():
    """The frozen prefix's rows follow extract's rule; SHA_A stands for the sha256 of the prefix's ONNX bytes."""
    assert prefix_fingerprint(SHA_A, PREPROCESSING) == EXTRACT


def test_store_keys():
    assert store_key(SHA_B, view_id(0, PREPROCESSING)) == PLAIN_KEY
    assert store_key(SHA_B, view_id(3, PREPROCESSING)) == AUGMENTED_KEY


@pytest.fixture
def prepared(project) -> Path:
    """The files the run fingerprint reads: the backbone's weights, classes.json, decoding.json."""
    backbone_files.WEIGHTS.parent.mkdir(parents=True)
    backbone_files.WEIGHTS.write_bytes(bytes(range(256)) * 4)
    manifest.CLASSES.parent.mkdir(parents=True)
    manifest.CLASSES.write_text(json.dumps(["cat", "dog", "eel"]))
    manifest.DECODING.write_text(json.dumps({"bit_depth": "auto"}))
    return project.root


def test_finetune_run_fingerprint(prepared):
    params = load_params(resolve_estimators=False, resolve_backbone=False)
    head = Head("logreg", {"classes": ["cat", "dog", "eel"], "layers": 1, "format": "layers", "val_accuracy": 0.5},
                arrays={"w0": np.arange(6, dtype=np.float32).reshape(3, 2), "b0": np.zeros(3, np.float32),
                        "mean": np.ones(2, np.float32), "scale": np.full(2, 2.0, np.float32)})
    train = LabelledImages([ViewRequest("a.png", SHA_A, 0), ViewRequest("b.png", SHA_B, 0)],
                           np.array([0, 2], dtype=np.int64))
    val = LabelledImages([ViewRequest("c.png", SHA_B, 0)], np.array([1], dtype=np.int64))
    assert run_fingerprint(params, 2, "frozen", head, train, val) == RUN
    assert run_fingerprint(params, "all", "train", None, train, val) == RUN_FRESH_HEAD
    # the frozen prefix's rows are inputs: another export's rows are another run
    with_rows = {run_fingerprint(params, 2, "frozen", head, train, val, prefix_rows) for prefix_rows in (SHA_A, SHA_B)}
    assert len(with_rows) == 2 and RUN not in with_rows


STORE_DIGESTS = ["6b54b8e41082fe0c1cddb0d5c888964250f3eea075a895705d5d7ca0df7aacea",
                 "d0c1faaa8d97d22f2ebd6591ce8a4736869ad3806b25c43a37f549c052a79444"]


def test_store_file_digests(tmp_path):
    """A store file's recorded checksums (what a later run checks it against) for fixed rows."""
    import h5py

    from transfer_learning.features.store import DIGEST_ATTRS, FeatureStore

    keys = [store_key(SHA_A, "0"), store_key(SHA_B, "0")]
    with FeatureStore(tmp_path, EXTRACT, 3, "float32") as store:
        store.add(keys, np.arange(6, dtype=np.float32).reshape(2, 3) / 7)
        store.commit()
        store.compact()
    files = sorted((tmp_path / EXTRACT).glob("*.h5"))
    assert len(files) == 1
    with h5py.File(files[0], "r") as handle:
        assert [str(handle.attrs[name]) for name in DIGEST_ATTRS] == STORE_DIGESTS
