"""The strategy advisor: real MobileNetV2 ImageNet weights on tiny real image folders (photo crops vs digits),
the quadrant -> strategy mapping, thresholds from params, random init, and the file finetune's `auto` reads."""
import contextlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from stages import advise, download, prepare
from tests.conftest import Project, write_digits
from transfer_learning.advise import advisor
from transfer_learning.common.errors import UserError
from transfer_learning.common.metrics import write_metrics
from transfer_learning.data import manifest
from transfer_learning.params import AdviseParams, load_params

BLOCKS = [f"features.{i}" for i in range(19)]  # MobileNetV2's blocks
SPLIT = {"per_class": None, "val_fraction": 0.2, "test_fraction": 0.2}


def write_photo_crops(folder: Path, per_class: int = 5) -> None:
    """Seeded square crops of real colour photos, one class per photo."""
    rng = np.random.default_rng(0)
    for name, photo in {"astronaut": skdata.astronaut(), "coffee": skdata.coffee(), "cat": skdata.chelsea(),
                        "rocket": skdata.rocket()}.items():
        (folder / name).mkdir(parents=True)
        height, width = photo.shape[:2]
        for i in range(per_class):
            side = int(min(height, width) * rng.uniform(0.5, 1.0))
            y, x = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
            Image.fromarray(np.ascontiguousarray(photo[y:y + side, x:x + side])).save(folder / name / f"{i}.png")


@pytest.fixture(scope="module")
def pretrained_backbone(tmp_path_factory) -> Path:
    """models/ with the real MobileNetV2 IMAGENET1K_V1 backbone, downloaded once for the module."""
    root = tmp_path_factory.mktemp("advise-backbone")
    with contextlib.chdir(root):
        Project(root).params()
        download.main()
    return root / "models"


def run_advisor(project: Project, source: str, **advise_params) -> dict:
    project.params(data={"source": source, **SPLIT}, advise=advise_params)
    prepare.main()
    advise.main()
    return json.loads(Path("metrics/advice.json").read_text())


@pytest.fixture
def photos_and_digits(project, pretrained_backbone) -> Project:
    shutil.copytree(pretrained_backbone, "models")
    write_photo_crops(Path("photos"))
    write_digits(Path("digit-images"), per_class=5)
    return project


def test_photo_crops_are_similar_and_digits_are_different(photos_and_digits, caplog):
    caplog.set_level(logging.INFO, logger="transfer_learning.common.allocator")
    photos = run_advisor(photos_and_digits, "photos", sample=16)
    assert "keeps freed memory for the next batch" in caplog.text  # the measurement's malloc setting
    report = Path("reports/advice.md").read_text()
    digits = run_advisor(photos_and_digits, "digit-images", sample=16)

    assert photos["domain"] == "similar" and digits["domain"] == "different"
    assert photos["similarity"]["measure"] == digits["similarity"]["measure"] == "bn_shift"
    assert photos["similarity"]["bn_layers"] == 52 and photos["similarity"]["images"] == 12
    assert 2 * photos["similarity"]["value"] < AdviseParams().similar_shift < digits["similarity"]["value"] / 2
    assert photos["similarity"]["top1_confidence"] > 2 * digits["similarity"]["top1_confidence"]
    assert photos["images_per_class"]["train"] == {"astronaut": 3, "cat": 3, "coffee": 3, "rocket": 3}
    assert photos["size"] == digits["size"] == "small"
    assert (photos["quadrant"], photos["strategy"], photos["unfreeze"]) == ("small-similar", "frozen_features", 0)
    assert (digits["quadrant"], digits["strategy"], digits["unfreeze"]) == ("small-different", "partial_finetune", 2)
    assert digits["unfrozen_blocks"] == ["features.17", "features.18"]
    assert advisor.recommended_unfreeze() == 2
    for key in ("advise.large_per_class", "advise.similar_shift", "advise.sample", "frozen_features"):
        assert key in report


def test_thresholds_come_from_params(photos_and_digits):
    lenient = run_advisor(photos_and_digits, "digit-images", sample=8, large_per_class=2, similar_shift=10.0)
    assert (lenient["size"], lenient["domain"], lenient["strategy"], lenient["unfreeze"]) == \
        ("large", "similar", "full_finetune", "all")
    assert lenient["similarity"]["threshold"] == 10.0 and lenient["large_per_class"] == 2
    # the same data under the default similar_shift: test_photo_crops_are_similar_and_digits_are_different (different),
    # and large-different's strategy and report: test_each_quadrant_has_its_strategy

    photos_and_digits.params(advise={"partial_unfreeze": 5, "similar_shift": 0.001})
    params = load_params(resolve_estimators=False).advise
    measured = advisor.Measurement(images=8, bn_shift=0.01, bn_layers=52, top1_confidence=0.5, entropy=0.3,
                                   seconds=1.0)
    advice = advisor.advise({"a": 10, "b": 12}, measured, params, "IMAGENET1K_V1", BLOCKS)
    assert (advice["strategy"], advice["unfreeze"]) == ("partial_finetune", 5)
    assert advice["unfrozen_blocks"] == BLOCKS[-5:]


def measurement(bn_shift: float | None = 0.03, top1: float = 0.5) -> advisor.Measurement:
    return advisor.Measurement(images=16, bn_shift=bn_shift, bn_layers=0 if bn_shift is None else 52,
                               top1_confidence=top1, entropy=0.3, seconds=1.0)


@pytest.mark.parametrize("per_class, bn_shift, expected", [
    ([30, 40], 0.03, ("small-similar", "frozen_features", 0)),
    ([30, 40], 0.30, ("small-different", "partial_finetune", 2)),
    ([1000, 5000, 10], 0.03, ("large-similar", "full_finetune", "all")),  # the median class decides
    ([1200, 1300], 0.30, ("large-different", "from_scratch", "all")),
])
def test_each_quadrant_has_its_strategy(per_class, bn_shift, expected):
    counts = {f"class {i}": n for i, n in enumerate(per_class)}
    advice = advisor.advise(counts, measurement(bn_shift), AdviseParams(), "IMAGENET1K_V1", BLOCKS)
    assert (advice["quadrant"], advice["strategy"], advice["unfreeze"]) == expected
    assert advice["size"] + "-" + advice["domain"] == advice["quadrant"]
    assert {"strategy", "unfreeze", "size", "domain", "similarity", "images_per_class"} <= set(advice)
    report = advisor.report(advice)
    assert f"`finetune.unfreeze: {expected[2]}`" in report and "advise.large_per_class" in report
    assert ("`backbone.weights: none`" in report) == (expected[1] == "from_scratch")


def test_without_batchnorm_statistics_the_top1_confidence_decides():
    params = AdviseParams(similar_confidence=0.4)
    similar = advisor.advise({"a": 5}, measurement(None, top1=0.5), params, "IMAGENET1K_V1", BLOCKS)
    different = advisor.advise({"a": 5}, measurement(None, top1=0.2), params, "IMAGENET1K_V1", BLOCKS)
    assert similar["similarity"]["measure"] == "top1_confidence"
    assert similar["similarity"]["param"] == "advise.similar_confidence" in advisor.report(similar)
    assert (similar["domain"], different["domain"]) == ("similar", "different")


def test_partial_depth_is_capped_at_the_backbone_blocks():
    advice = advisor.advise({"a": 5}, measurement(0.5), AdviseParams(partial_unfreeze=50), "IMAGENET1K_V1", BLOCKS[:8])
    assert advice["unfreeze"] == 8 and advice["unfrozen_blocks"] == BLOCKS[:8]


def test_random_init_has_no_pretraining_domain(project):
    project.params(backbone={"weights": "none"})
    download.main()
    write_digits(Path("digit-images"), per_class=5)
    advice = run_advisor(project, "digit-images")
    assert advice["similarity"] is None and advice["weights"] is None
    assert (advice["domain"], advice["strategy"], advice["unfreeze"]) == ("different", "from_scratch", "all")
    report = Path("reports/advice.md").read_text()
    assert "no pretraining domain" in report
    assert "`backbone.weights: none`" in report and "`finetune.unfreeze: all`" in report
    assert advisor.recommended_unfreeze() == "all"


def test_an_image_gone_since_prepare_is_named(photos_and_digits):
    photos_and_digits.params(data={"source": "digit-images", **SPLIT})
    prepare.main()
    first_train = next(r.path for r in manifest.read() if r.split == "train")
    Path(first_train).unlink()
    with pytest.raises(UserError, match=f"{first_train}.*dvc repro -f -s prepare"):
        advise.main()


def test_recommended_unfreeze_reads_the_advice_and_says_how_to_make_it(project):
    with pytest.raises(UserError, match=r"metrics/advice.json does not exist: run `dvc repro advise`"):
        advisor.recommended_unfreeze()
    for unfreeze in (0, 3, "all"):
        write_metrics("advice", {"unfreeze": unfreeze})
        assert advisor.recommended_unfreeze() == unfreeze
    for bad in (-1, "some", True, None):
        write_metrics("advice", {"unfreeze": bad})
        with pytest.raises(UserError, match="dvc repro advise"):
            advisor.recommended_unfreeze()
    Path("metrics/advice.json").write_text("{")
    with pytest.raises(UserError, match="dvc repro advise"):
        advisor.recommended_unfreeze()


def test_advise_params_are_validated(project):
    project.params(advise={"smaple": 16, "similar_shift": -1})
    with pytest.raises(UserError) as caught:
        load_params()
    message = str(caught.value)
    assert "advise.smaple: unknown key" in message and "sample" in message.split("valid keys here:")[1]
    assert "advise.similar_shift" in message
