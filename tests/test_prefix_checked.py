"""The frozen prefix's export is checked against torch once per data-parallel run, by the launcher: a rank takes the
kept file without checking it again only when its bytes are the ones the launcher checked, and checks a file
swapped together with its record itself. A random-init MobileNetV2 cut early, at 32 px: the property is about
files and digests, not the net."""
from __future__ import annotations

import json
import logging

import onnx
import pytest
from torchvision.models import get_model

from transfer_learning.backbone.anatomy import anatomy
from transfer_learning.common.hashing import sha256_bytes, sha256_file
from transfer_learning.data.images import Preprocessing
from transfer_learning.finetune.model import FineTuneNet
from transfer_learning.finetune.prefix import Checked, FlatPrefix, checked_export
from transfer_learning.layers.kept import record_of

SIZE = 32
ATOL = 1e-4


def test_a_rank_reuses_only_the_bytes_the_launcher_checked(tmp_path, caplog):
    model = get_model("mobilenet_v2", weights=None)
    net = FineTuneNet(model, anatomy(model), "features.3.add", "avg", 1, "frozen", None, 3, SIZE)
    module = FlatPrefix(net).eval()
    preprocessing = Preprocessing(resize=36, crop=SIZE, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                  interpolation="bilinear")
    made_from = {"what": "a test prefix", "prefix_node": net.split.prefix_node, "opset": 18}
    path = tmp_path / "prefix.onnx"
    caplog.set_level(logging.INFO)

    data, max_abs_diff = checked_export(module, made_from, path, preprocessing, ATOL)  # the launcher's
    assert max_abs_diff <= ATOL
    launcher = Checked(sha256_bytes(data), 0.125)  # a figure no check here would give: returned only if reused

    caplog.clear()
    assert checked_export(module, made_from, path, preprocessing, ATOL, launcher) == (data, 0.125)
    assert "the bytes the launcher checked against torch" in caplog.text

    # another file swapped in together with its record (the same graph, other bytes): the record's digest passes,
    # the launcher's does not, so the rank checks the file against torch itself (a damaged one fails that check and
    # is exported again, as in one process) and reports its own figure
    swapped = onnx.load(str(path))
    swapped.doc_string = "swapped in"
    path.write_bytes(swapped.SerializeToString())
    record = record_of(path)
    record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": sha256_file(path)}))
    caplog.clear()
    used, checked_here = checked_export(module, made_from, path, preprocessing, ATOL, launcher)
    assert f"the frozen prefix's export {path} is not the file the launcher checked" in caplog.text
    assert used == path.read_bytes() != data and checked_here == pytest.approx(max_abs_diff, rel=1e-6, abs=1e-12)
