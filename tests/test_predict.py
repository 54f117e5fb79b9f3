"""predict and the deploy ONNX: the real exported MobileNetV2 with ONNX Runtime, real heads, real image files."""
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from stages import evaluate, extract, train_heads
from stages import predict as predict_cli
from tests.conftest import REPO, built_once
from transfer_learning.backbone import files as backbone_files
from transfer_learning.backbone.onnx_export import cpu_session
from transfer_learning.common.errors import UserError
from transfer_learning.deploy import predict
from transfer_learning.deploy.onnx import PIXELS, PROBABILITIES
from transfer_learning.features.split_files import read_split
from transfer_learning.heads import files as head_files

HEADS = {
    "logreg": {"type": "logistic", "C": [1.0]},
    "mlp": {"type": "mlp", "hidden": [16], "epochs": 5},
    "knn": {"type": "sklearn", "estimator": "sklearn.neighbors.KNeighborsClassifier", "grid": {"n_neighbors": [1]}},
}


@pytest.fixture(scope="module")
def trained(exported, tmp_path_factory) -> Path:
    """`exported` (digits PNGs, MobileNetV2) with features extracted, heads trained and evaluated, once."""
    import yaml

    def build(root: Path) -> None:
        shutil.copytree(exported, root, dirs_exist_ok=True)
        with contextlib.chdir(root):
            params = yaml.safe_load(Path("params.yaml").read_text())
            params["heads"] = HEADS
            Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            extract.main()
            train_heads.main()
            evaluate.main()

    return built_once(tmp_path_factory, "predict-trained", build)


@pytest.fixture
def here(trained, monkeypatch) -> Path:
    monkeypatch.chdir(trained)
    return trained


def test_predictions_of_the_test_images_match_the_head_on_extracted_features(here):
    test = read_split("test")
    results = predict.predict([Path(p) for p in test.paths], "logreg", top_k=3)
    expected = head_files.load("logreg").scores(test.features)
    classes = test.classes
    for result, row in zip(results, expected):
        assert result.error is None and len(result.top) == 3
        assert result.top[0][0] == classes[int(row.argmax())]
        assert result.top[0][1] == pytest.approx(float(row.max()), abs=1e-4)
        assert [p for _, p in result.top] == sorted((p for _, p in result.top), reverse=True)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "stages.predict", *args], capture_output=True, text=True, env=env)


def test_a_folder_with_a_bad_file_still_predicts_the_others(here, tmp_path):
    folder = tmp_path / "new"
    shutil.copytree(here / "images" / "3", folder / "threes")
    (folder / "threes" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    result = run_cli(str(folder), str(tmp_path / "missing.jpg"), "--model", "knn", "--top-k", "2")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    good = [line for line in lines if "ERROR" not in line]
    assert len(good) == 6 and all(line.count(" 0.") + line.count(" 1.") == 2 for line in good)
    assert any(line.startswith(f"{folder / 'threes' / 'broken.png'}: ERROR not a decodable image") for line in lines)
    assert f"{tmp_path / 'missing.jpg'}: ERROR no such file or folder" in lines
    assert "2 of 8 input(s) could not be predicted" in result.stderr


def test_json_output_and_the_default_model(here):
    image = sorted((here / "images" / "7").iterdir())[0]
    result = run_cli(str(image), "--json", "--top-k", "4")
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["model"] == predict.default_model()
    [prediction] = output["predictions"]
    assert prediction["path"] == str(image) and len(prediction["top"]) == 4
    assert {"class", "score"} == set(prediction["top"][0])


def pixels_of(paths: list[str]) -> torch.Tensor:
    preprocessing = backbone_files.load().preprocessing
    return torch.stack([predict.load_pixels(Path(p), preprocessing) for p in paths])


@pytest.mark.parametrize("model", ["logreg", "mlp", "knn"])
def test_deploy_onnx_gives_the_two_step_probabilities(here, model):
    path = predict.deploy(model)
    assert path == Path(f"models/deploy/{model}.onnx")
    deployed = onnx.load(str(path))
    props = {p.key: p.value for p in deployed.metadata_props}
    assert json.loads(props["classes"]) == read_split("test").classes and props["head"] == model

    session = cpu_session(path)
    test = read_split("test")
    two_step = predict.TwoStepPredictor(head_files.load(model), backbone_files.ONNX.read_bytes(), batch_size=8,
                                        providers=["CPUExecutionProvider"])
    preprocessing = backbone_files.load().preprocessing
    for batch in (test.paths[:1], test.paths[1:4]):  # two batch sizes: the batch dimension stays dynamic
        pixels = pixels_of(batch)
        got = session.run([PROBABILITIES], {PIXELS: pixels.numpy()})[0]
        expected = two_step(pixels, preprocessing)
        assert got.shape == expected.shape == (len(batch), 10)
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_a_pickled_head_cannot_be_deployed(trained, tmp_path, monkeypatch):
    import yaml

    shutil.copytree(trained, tmp_path / "project")
    monkeypatch.chdir(tmp_path / "project")
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["heads"] = {"logreg": HEADS["logreg"],  # NearestCentroid: no skl2onnx converter, so it is pickled
                       "centroid": {"type": "sklearn", "estimator": "NearestCentroid", "allow_pickle": True}}
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    train_heads.main()
    with pytest.raises(UserError, match="head 'centroid' is a pickled scikit-learn estimator.*deployable heads: logreg"):
        predict.deploy("centroid")


def test_an_unknown_model_lists_the_trained_ones(here):
    result = run_cli("images", "--model", "nope")
    assert result.returncode == 2
    assert "no trained head 'nope' in models/heads; trained: knn, logreg, mlp" in result.stderr



def test_a_head_trained_on_other_features_is_refused(here):
    head = head_files.load("logreg")
    head.meta["features_fingerprint"] = "0" * 64
    with pytest.raises(UserError, match="head 'logreg' was trained on other features.*run `dvc repro`"):
        predict.check_features_match(head, backbone_files.load())


def test_the_default_model_is_the_best_on_val_not_on_test(here, tmp_path, monkeypatch):
    board = tmp_path / "evaluate.json"
    monkeypatch.setattr(predict, "EVALUATE_METRICS", board)
    board.write_text(json.dumps({  # test accuracy ranks knn, mlp, logreg; val ranks mlp, knn, logreg
        "knn": {"accuracy": 0.99, "val_accuracy": 0.8}, "logreg": {"accuracy": 0.5, "val_accuracy": 0.7},
        "mlp": {"accuracy": 0.6, "val_accuracy": 0.9}, "best": "mlp"}))
    assert predict.default_model() == "mlp"
    board.write_text(json.dumps({
        "knn": {"accuracy": 0.99, "val_accuracy": 0.95}, "mlp": {"accuracy": 0.9, "val_accuracy": 0.6},
        "logreg": {"accuracy": 0.5, "val_accuracy": 0.7}}))
    assert predict.default_model() == "knn"
    assert predict.default_model(deployable=True) == "knn"  # an ONNX head: deployable like the others


def test_without_val_accuracy_in_evaluate_json_the_heads_own_record_decides(trained, tmp_path, monkeypatch):
    work = tmp_path / "project"
    shutil.copytree(trained / "models", work / "models")
    monkeypatch.chdir(work)
    for name, val_accuracy in {"knn": 0.5, "logreg": 0.6, "mlp": 0.9}.items():
        meta_file = Path("models/heads") / name / "head.json"
        meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "val_accuracy": val_accuracy}))
    board = Path("evaluate.json")  # as evaluate wrote it before it recorded val accuracy
    board.write_text(json.dumps({"knn": {"accuracy": 0.99}, "logreg": {"accuracy": 0.8}, "mlp": {"accuracy": 0.5}}))
    monkeypatch.setattr(predict, "EVALUATE_METRICS", board)
    assert predict.default_model() == "mlp"


def test_an_empty_argument_is_an_error_not_the_current_folder(here, capsys):
    with pytest.raises(SystemExit) as exited:
        predict_cli.main(["images/7", ""])
    output = capsys.readouterr()
    assert exited.value.code == 2
    assert "an image or folder argument is empty" in output.err and output.out == ""


def test_damaged_records_are_errors_that_name_the_file(trained, tmp_path, monkeypatch):
    work = tmp_path / "project"
    shutil.copytree(trained / "models", work / "models")
    monkeypatch.chdir(work)
    board = Path("evaluate.json")
    monkeypatch.setattr(predict, "EVALUATE_METRICS", board)
    board.write_text('{"logreg": {"val_accuracy": 0.9}, "mlp": ')  # cut short
    with pytest.raises(UserError, match=r"evaluate.json is not valid JSON .*`dvc repro evaluate` \(or name the "
                                        r"model: --model\)"):
        predict.default_model()
    board.unlink()
    head_json = Path("models/heads/mlp/head.json")
    head_json.write_bytes(head_json.read_bytes()[:-30])
    with pytest.raises(UserError, match=r"models/heads/mlp/head.json is not valid JSON .*`dvc checkout "
                                        r"models/heads/mlp`"):
        predict.default_model()
