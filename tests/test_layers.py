"""The layer sweep: one ONNX graph gives every block's rows, equal to what `backbone.cut: N` computes, which a
later cut-N run reuses; damaged kept exports and store files are refused. A tiny random-init ResNet-18 at 32 px
on 40 digits: the sweep's logic, not its accuracy."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torchvision.models import get_model

from stages import export, extract, layers, prepare
from tests.conftest import REPO, Project, built_once, work_copy, write_digits
from transfer_learning.backbone import files as backbone_files
from transfer_learning.backbone.anatomy import anatomy
from transfer_learning.common.errors import UserError
from transfer_learning.data.images import Preprocessing
from transfer_learning.common.hashing import sha256_file
from transfer_learning.data import manifest
from transfer_learning.features.fingerprint import fingerprint
from transfer_learning.features.split_files import read_plain_keys, read_split
from transfer_learning.features.store import FeatureStore
from transfer_learning.layers import graph
from transfer_learning.layers.adopt import ADOPT_RTOL
from transfer_learning.layers.blocks import chosen_blocks
from transfer_learning.layers.kept import kept_export, record_of

SWEPT = [2, 3]  # of ResNet-18's 6 blocks: conv1, bn1, layer1..layer4; the sweep exports up to the deepest


def set_params(**sections) -> None:
    import yaml

    from tests.conftest import merged
    path = Path("params.yaml")
    path.write_text(yaml.safe_dump(merged(yaml.safe_load(path.read_text()), sections), sort_keys=False))


def save_tiny_backbone() -> None:
    torch.manual_seed(0)
    model = get_model("resnet18", weights=None).eval()
    preprocessing = Preprocessing(resize=32, crop=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                  interpolation="bilinear")
    backbone_files.save(model, {"arch": "resnet18", "weights": None, "sha256": None, "url": None, "categories": None,
                                "num_classes": 1000, "preprocessing": preprocessing.to_json(),
                                **anatomy(model).to_json()})


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    """A project with 40 prepared digits, the tiny backbone, and one sweep of the blocks in SWEPT."""
    import contextlib

    def build(root: Path) -> None:
        with contextlib.chdir(root):
            write_digits(root / "images", 4)
            Project(root).params(data={"source": "images", "per_class": None, "val_fraction": 0.25,
                                       "test_fraction": 0.25},
                                 backbone={"arch": "resnet18", "weights": "none"},
                                 extract={"batch_size": 16, "workers": 0, "store": "store"},
                                 layers={"enabled": True, "blocks": SWEPT, "C": [0.1, 1], "adopt": "best"})
            prepare.main()
            save_tiny_backbone()
            layers.main()

    return built_once(tmp_path_factory, "swept", build)


@pytest.fixture
def work(swept, tmp_path, monkeypatch) -> Path:
    return work_copy(swept, tmp_path, monkeypatch)


def sweep_metrics() -> dict:
    return json.loads(Path("metrics/layers.json").read_text())


def sweep_rows(block: int, keys: list[str]) -> np.ndarray:
    """Block `block`'s rows as the sweep stored them (under the sweep graph's own fingerprint for the block)."""
    backbone = backbone_files.load()
    preprocessing = backbone.preprocessing.with_bit_depth(manifest.read_bit_depth())
    output = chosen_blocks([block], backbone.anatomy)[0].output
    folder = Path("store") / fingerprint(f"{sha256_file(graph.BLOCKS_ONNX)}/{output}", preprocessing, "float32")
    with FeatureStore.existing(folder) as store:
        return np.concatenate(list(store.gather(keys)))


@pytest.mark.slow
def test_one_graph_gives_every_blocks_rows_as_the_cut_export_computes_them_and_the_best_is_reused(work):
    m = sweep_metrics()
    best = m["best"]["block"]
    assert m["computed"] == m["images"] == 40 and best in SWEPT and list(m["adopted"]) == [str(best)]
    assert "seconds" not in m and "total" in json.loads(Path("reports/timings/layers.json").read_text())
    table = Path("plots/layers/accuracy.csv").read_text().splitlines()
    assert table[0].startswith("block,name,feature_dim,val_accuracy") and [r.split(",")[0] for r in table[1:]] == \
        ["2", "3"]
    assert "| 3 | layer1 | 64 |" in Path("reports/layers.md").read_text()
    assert m["adopted"][str(best)]["adopted"] == 40 and m["adopted"][str(best)]["max_rel_diff"] <= ADOPT_RTOL
    for block in SWEPT:  # the ordinary pipeline at `backbone.cut: block`
        set_params(backbone={"cut": block})
        export.main()
        extract.main()
        got = json.loads(Path("metrics/extract.json").read_text())
        if block == best:  # adopted: nothing to compute
            assert (got["computed"], got["reused"]) == (0, 40)
            assert got["fingerprint"] == m["adopted"][str(best)]["fingerprint"]
            set_params(extract={"store": "fresh-store"})  # and what this cut's export computes from scratch:
            extract.main()
            set_params(extract={"store": "store"})
        assert json.loads(Path("metrics/extract.json").read_text())["computed"] == 40
        keys = read_plain_keys("train")
        ordinary, swept = read_split("train").plain().features, sweep_rows(block, keys)
        assert ordinary.shape == swept.shape == (len(keys), 64)
        assert np.abs(ordinary - swept).max() <= ADOPT_RTOL * max(1.0, float(np.abs(ordinary).max()))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_kept_sweep_graph_is_exported_again_to_the_same_bytes(work, caplog):
    good = graph.BLOCKS_ONNX.read_bytes()
    flip_byte(graph.BLOCKS_ONNX, len(good) // 2)
    with caplog.at_level(logging.INFO):
        layers.main()
    assert "blocks.onnx its bytes fail the sha256" in caplog.text
    assert graph.BLOCKS_ONNX.read_bytes() == good  # the export is deterministic: the same bytes, the same rows
    assert sweep_metrics()["computed"] == 0


def test_a_kept_export_is_reused_only_with_its_recipe_and_digest(tmp_path, caplog):
    path, exports = tmp_path / "cut-001.onnx", []

    def export(target: Path) -> None:
        exports.append(target)
        target.write_bytes(b"onnx bytes " * 100)

    recipe = {"nodes": ["layer1"], "opset": 18}
    first = kept_export(path, recipe, export)
    assert kept_export(path, recipe, export) == first and len(exports) == 1  # reused
    flip_byte(path, 500)
    with caplog.at_level(logging.INFO):
        assert kept_export(path, recipe, export) == first and len(exports) == 2  # damaged: exported again
    assert "its bytes fail the sha256" in caplog.text
    kept_export(path, {**recipe, "opset": 17}, export)
    assert len(exports) == 3 and json.loads(record_of(path).read_text())["recipe"]["opset"] == 17


def test_a_damaged_store_file_is_refused_and_its_rows_recomputed(work, caplog):
    adopted = {record["fingerprint"] for record in sweep_metrics()["adopted"].values()}
    folder = next(p for p in sorted(Path("store").iterdir()) if p.is_dir() and p.name not in adopted)  # a block's
    (store_file,) = folder.glob("*.h5")
    with h5py.File(store_file, "r") as handle:
        offset = handle["features"].id.get_offset()
    flip_byte(store_file, offset + 3)
    with caplog.at_level(logging.INFO):
        layers.main()
    assert "fails its checksum" in caplog.text and list(folder.glob("*.rejected-*"))
    assert sweep_metrics()["computed"] == 40


def test_bad_blocks_fail_naming_the_key_and_the_valid_blocks(work):
    set_params(layers={"blocks": [2, 9]})
    with pytest.raises(UserError, match=r"layers.blocks: \[9\] .*valid: all, or numbers 1..6 .*3=layer1"):
        layers.main()
    set_params(layers={"blocks": [0]})
    with pytest.raises(UserError, match=r"layers.blocks"):
        layers.main()


def test_disabled_writes_a_skip_record_without_importing_torch(work):
    set_params(layers={"enabled": False})
    code = "import sys; from stages import layers; layers.main(); print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert run.stdout.strip() == "False"
    assert sweep_metrics() == {"enabled": False}
    assert [p.name for p in Path("plots/layers").iterdir()] == ["nothing-to-plot.txt"]  # no empty chart
