"""Each stage process imports what its work uses and nothing more: every DVC run starts each stage as a new process,
and importing torch, torchvision (which imports torch._dynamo) or scikit-learn costs seconds of CPU there.

One subprocess imports the stages from the lightest to the heaviest and, after each group, names the heavy
packages that are loaded: what a group may not import is what no group before it imported either."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
from sklearn.datasets import load_sample_images

from tests.conftest import REPO, Project
from tests.test_layout import imported_names
from tests.test_prepare import plain_class
from transfer_learning.backbone.export import sample_photos
from transfer_learning.common import catalog
from transfer_learning.data.manifest import MANIFEST

HEAVY = ("torch", "torchvision", "torch._dynamo", "sklearn", "scipy", "onnx", "skl2onnx", "dvclive")

# (stages imported, what else runs, heavy packages none of them may load); in this order, in one process
GROUPS = [
    # they read params, files, HDF5 and images: no deep-learning or ML library at all
    (["check_params", "prepare", "audit", "evaluate", "finetune", "layers", "store"], "",
     ["torch", "torchvision", "sklearn", "scipy", "onnx", "skl2onnx", "dvclive"]),
    # ONNX Runtime runs the backbone: extract imports torch only to compute rows (its DataLoader), an extract that
    # reuses every row from the store needs none
    (["extract"], "", ["torch", "torchvision", "sklearn", "scipy", "onnx", "skl2onnx", "dvclive"]),
    # scikit-learn for the heads; torch only for a linear or MLP head, and a scikit-learn head's class is imported
    # from its own module, not through scikit-learn's all_estimators (which imports torch). scikit-learn imports
    # pandas only to keep it at hand: hidden while scikit-learn loads (heads/selection.py)...
    (["train_heads"], "SklearnHead.model_validate({'type': 'sklearn', 'estimator': 'KNeighborsClassifier'}, "
                      "context={'resolve_estimators': False}).new_estimator()",
     ["torch", "torchvision", "pandas"]),
    # ...and importable again after (a failed import fails the probe)
    ([], "import pandas", []),
    # prepare's whole run on a folder of images (the probe's working folder), decoding included: it re-runs on every
    # data edit and needs no torch (its stratified split's scikit-learn is loaded by now)
    ([], "from stages import prepare; prepare.main()", ["torch", "torchvision"]),
    # the weights are loaded only when the model is built (advise): reading models/backbone/meta.json imports no
    # torchvision
    (["predict", "advise"], "", ["torchvision", "torch._dynamo"]),
]

PROBE = """
import json, sys
from transfer_learning.params import SklearnHead
loaded = []
for stages, run, heavy in json.loads(sys.argv[1]):
    for stage in stages:
        __import__(f"stages.{stage}")
    exec(run)
    loaded.append(sorted(m for m in heavy if m in sys.modules))
print(json.dumps(loaded))
"""


def test_each_stage_imports_no_heavy_package_it_does_not_use(tmp_path):
    catalog.sklearn_classifiers()  # the listing new_estimator reads: built here when missing (that imports all)
    Project(tmp_path).params(data={"source": "photos", "per_class": None})
    for c, label in enumerate(("ant", "bee", "cow")):
        plain_class(tmp_path / "photos" / label, 10, seed=c + 1)
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(GROUPS)], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    found = {", ".join(stages) or run: packages for (stages, run, _), packages in zip(GROUPS, loaded) if packages}
    assert not found, f"stages import heavy packages their work does not use: {found}"
    with open(tmp_path / MANIFEST, newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 30  # prepare really ran, on every image


def test_the_probe_sees_a_heavy_import():
    """The check above can fail: a module a group imports is named (a cheap one stands in for a heavy one)."""
    groups = [(["check_params"], "import colorsys", ["colorsys", "torch"])]
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(groups)], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [["colorsys"]]


def test_export_reads_the_sample_photos_as_scikit_learn_loads_them_without_importing_it():
    """The parity photos are scikit-learn's sample images, pixel for pixel, read without importing scikit-learn
    (the export stage's process would pay seconds for it)."""
    ours, theirs = [np.asarray(photo) for photo in sample_photos()], load_sample_images().images
    assert len(ours) == len(theirs) == 2
    for mine, sklearn_s in zip(ours, theirs):
        assert mine.dtype == sklearn_s.dtype and mine.shape == sklearn_s.shape
        assert np.array_equal(mine, sklearn_s)
    imports = [name for _, name in imported_names(REPO / "transfer_learning/backbone/export.py")]
    assert not [name for name in imports if name.split(".")[0] in ("sklearn", "scipy")], imports
