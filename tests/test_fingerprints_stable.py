"""Fingerprints and store keys are byte-for-byte stable: existing feature stores, cached prefix outputs and fine-tune
checkpoints stay valid only while the same inputs give the same digests; a change here orphans every user's store.

A fingerprint holds the digest of what the running code and libraries make of the probe images (data/probes.py),
which rightly differs between library versions; here it is held fixed (PIXELS), and tests/test_probe_fingerprint.py
checks that it changes exactly when a probe's pixels do. The digests below were computed when that digest took the
place of a hand-bumped pipeline version. An augmented view's key holds the digest of what the augmentation makes of
the probes (features/views.py), held fixed here too (AUGMENTED_PIXELS); AUGMENTED_KEY was computed when it came in."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from transfer_learning.backbone import files as backbone_files
from transfer_learning.data import manifest
from transfer_learning.data import images
from transfer_learning.data.images import Preprocessing
from transfer_learning.features.fingerprint import fingerprint
from transfer_learning.features.store import store_key
from transfer_learning.features import views
from transfer_learning.features.views import ViewRequest, view_id
from transfer_learning.finetune.data import LabelledImages
from transfer_learning.finetune.prefix import prefix_fingerprint
from transfer_learning.finetune.run import run_fingerprint
from transfer_learning.heads.files import Head
from transfer_learning.params import load_params

PIXELS = "5" * 64  # stands for the probe digest
AUGMENTED_PIXELS = "6" * 64  # stands for the augmented probes' digest


class FixedPixels(Preprocessing):
    """A preprocessing whose probe digest is PIXELS, whatever the libraries installed."""

    def probe_digest(self) -> str:
        return PIXELS


PREPROCESSING = FixedPixels(resize=232, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                            interpolation="bilinear", antialias=True, bit_depth=12)
SHA_A = "a" * 64
SHA_B = "0123456789abcdef" * 4

EXTRACT = "1dcb160d07932635a7a3a22f0c2a1edef7013516e0c517d689e4f3c480f473ee"
PLAIN_KEY = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef/0"
AUGMENTED_KEY = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef/aug-3155af43-3"
RUN = "e4c97c3fb715941a5e7ba19b315bbcbb1548b8219227d54d188d61ed099549bb"
RUN_FRESH_HEAD = "6850d7930e61cebd21c1f254ee45d1a29e265a9c5aa623a29adb814ea32ecce6"


def test_extract_feature_fingerprint():
    assert fingerprint(SHA_A, PREPROCESSING, "float32") == EXTRACT
    assert fingerprint(SHA_A, PREPROCESSING, "float32", "fp32") == EXTRACT


EXTRACT_INT8 = "8e8efcb4114437caf5cd306c74fb47b56df44e7e0b6cec2eb2f11a238b5a74e1"
EXTRACT_FP16 = "427e1a6b06e7f431b33046edfbcd200c96174adae0e2e8bb0f8c1c69929d8400"


def test_extract_feature_fingerprint_at_reduced_precision():
    """SHA_A stands for the converted model's sha256 (the bytes run), as extract passes it."""
    assert fingerprint(SHA_A, PREPROCESSING, "float32", "int8") == EXTRACT_INT8
    assert fingerprint(SHA_A, PREPROCESSING, "float32", "fp16") == EXTRACT_FP16


def test_finetune_prefix_fingerprint():
    """The frozen prefix's rows follow extract's rule; SHA_A stands for the sha256 of the prefix's ONNX bytes."""
    assert prefix_fingerprint(SHA_A, PREPROCESSING) == EXTRACT


def test_store_keys(monkeypatch):
    monkeypatch.setattr(views, "augment_digest", lambda preprocessing: AUGMENTED_PIXELS)
    assert store_key(SHA_B, view_id(0, PREPROCESSING)) == PLAIN_KEY
    assert store_key(SHA_B, view_id(3, PREPROCESSING)) == AUGMENTED_KEY


@pytest.fixture
def prepared(project, monkeypatch) -> Path:
    """The files the run fingerprint reads: the backbone's weights and meta.json, classes.json, decoding.json; the
    probe digest held at PIXELS."""
    backbone_files.WEIGHTS.parent.mkdir(parents=True)
    backbone_files.WEIGHTS.write_bytes(bytes(range(256)) * 4)
    backbone_files.META.write_text(json.dumps({
        "arch": "resnet18", "weights": None, "num_classes": 1000, "preprocessing": PREPROCESSING.to_json(),
        "node_names": ["x", "fc"], "classifier": "fc", "penultimate_node": "flatten", "blocks": [],
        backbone_files.WEIGHTS_DIGEST: "0" * 64}))
    monkeypatch.setattr(images, "probe_digest", lambda preprocessing: PIXELS)
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
