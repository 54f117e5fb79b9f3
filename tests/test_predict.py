"""predict and the deploy ONNX: the real exported MobileNetV2 with ONNX Runtime, real heads of every type, the real
fine-tuned model, real image files. What evaluate shows is what predict and the deployed file serve."""
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from stages import evaluate, extract, train_heads
from stages import predict as predict_cli
from tests.conftest import REPO, built_once, work_copy
from tests.test_finetune import HEADS as FINETUNE_HEADS
from tests.test_finetune import finetuned, heads_trained, set_params  # noqa: F401 - fixtures, shared builds
from tests.test_quantize import int8_calibrated  # noqa: F401 - fixture, a shared build
from transfer_learning.backbone import files as backbone_files
from transfer_learning.backbone.onnx_export import cpu_session
from transfer_learning.common.errors import UserError
from transfer_learning.data import manifest
from transfer_learning.deploy import onnx as deploy_onnx
from transfer_learning.deploy import predict, served
from transfer_learning.deploy.onnx import CHECK, PIXELS, PROBABILITIES
from transfer_learning.evaluate.choice import BEST_KEY, EVALUATE_METRICS
from transfer_learning.evaluate.report import CONFUSION_PLOTS
from transfer_learning.features import quantize
from transfer_learning.features.split_files import read_plain_keys, read_split
from transfer_learning.finetune import files as finetune_files
from transfer_learning.heads import files as head_files

# test_finetune's heads (logreg, knn) plus the two torch heads, trained long enough for clear classes
HEADS = {**FINETUNE_HEADS,
         "linear": {"type": "linear", "epochs": 30, "lr": 1.0e-2, "patience": 5},
         "mlp": {"type": "mlp", "hidden": [16], "epochs": 30, "lr": 1.0e-2, "patience": 5}}
MODELS = sorted(HEADS) + [finetune_files.MODEL_NAME]
INT8 = {"precision": "int8", "calibration_images": 6}
CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def every_model(finetuned, tmp_path_factory) -> Path:
    """test_finetune's fine-tuned project (logreg and kNN heads, one epoch of fine-tuning) with a linear and an MLP
    head added and evaluate run: every kind of model the pipeline serves, at fp32."""
    def build(root: Path) -> None:
        shutil.copytree(finetuned, root, dirs_exist_ok=True)
        with contextlib.chdir(root):
            set_params(heads=HEADS)
            train_heads.main(["linear", "mlp"])
            evaluate.main()

    return built_once(tmp_path_factory, "predict-every-model", build)


@pytest.fixture(scope="module")
def every_model_int8(every_model, int8_calibrated, tmp_path_factory) -> Path:
    """`every_model` at extract.precision int8: features, heads and evaluate again. The fine-tuned model stays as
    it is: one float ONNX export with its own backbone, which extract.precision does not change. The int8 backbone
    and its rows are `int8_calibrated`'s (the same backbone, calibration images and images, so the same cache key
    and fingerprint: extract reuses both and computes no row, which the int8 agreement test below asserts)."""
    def build(root: Path) -> None:
        shutil.copytree(every_model, root, dirs_exist_ok=True)
        shutil.copytree(int8_calibrated / "store", root / "store", dirs_exist_ok=True)
        with contextlib.chdir(root):
            set_params(extract=INT8)
            extract.main()
            train_heads.main()
            evaluate.main()

    return built_once(tmp_path_factory, "predict-every-model-int8", build)


@pytest.fixture
def here(every_model, monkeypatch) -> Path:
    """`every_model` itself, read only."""
    monkeypatch.chdir(every_model)
    return every_model


@pytest.fixture
def every_model_work(every_model, tmp_path, monkeypatch) -> Path:
    return work_copy(every_model, tmp_path, monkeypatch)


@pytest.fixture
def every_model_int8_work(every_model_int8, tmp_path, monkeypatch) -> Path:
    return work_copy(every_model_int8, tmp_path, monkeypatch)


def evaluated_scores(model: str, test) -> np.ndarray:
    """What evaluate scores a model by on the test split: a head on the extracted features, the fine-tuned model's
    test_scores.npz."""
    if model == finetune_files.MODEL_NAME:
        return finetune_files.read_test_scores(read_plain_keys("test"))
    return head_files.load(model).scores(test.features)


def preprocessing():
    return backbone_files.load().preprocessing.with_bit_depth(manifest.read_bit_depth())


def pixels_of_the_test_images() -> np.ndarray:
    served = preprocessing()
    return np.stack([predict.load_pixels(Path(p), served) for p in read_split("test").plain().paths])


def two_step(name: str):
    """What predict serves for head `name`: uint8 pixels -> scores."""
    head = head_files.load(name)
    served = predict.TwoStepPredictor(head, predict.check_features_match(head, backbone_files.load()), 32, CPU)
    return lambda pixels: served(pixels, preprocessing())


def assert_serves_predicts_class_on_every_probe_image(deployed_file: Path, model: str) -> None:
    """The deploy check's figures in the written file (its normalization within 0.01 grey level, predict's class on
    every probe image), and the written file itself, run again, giving predict's probabilities on the probes."""
    written = onnx.load(str(deployed_file))
    figures = json.loads({p.key: p.value for p in written.metadata_props}[CHECK])
    names, pixels = deploy_onnx.probe_pixels(preprocessing())
    assert figures["probe_images"] == len(names) >= 20 and figures["same_class"] == len(names), model
    assert figures["max_normalization_difference_grey_levels"] <= 0.01, model  # the same float32 arithmetic
    got = cpu_session(deployed_file).run([PROBABILITIES], {PIXELS: pixels})[0]
    if model == finetune_files.MODEL_NAME:
        served = predict.FineTunedPredictor(32, CPU, preprocessing())(pixels, preprocessing())
    else:
        served = two_step(model)(pixels)
    np.testing.assert_allclose(got, served, atol=1e-4, err_msg=model)


def assert_served_alike(capsys, providers: tuple[str, ...] = ("CPUExecutionProvider",), atol: float = 1e-4,
                        deployed_elsewhere: tuple[str, ...] = (), probed: tuple[str, ...] = ()) -> None:
    """For every model: evaluate's class (plots/confusion/<model>.csv), `python -m stages.predict`'s and the deployed
    file's (ONNX Runtime on uint8 pixels) are the same on every test image; the deployed probabilities are
    evaluate's within `atol`. Every image's top two classes are further apart than 10 × atol, so one class each
    is what all three must give, whatever the rounding. `deployed_elsewhere`: models whose deploy another test
    proves on byte-identical files; evaluate's and predict's classes are still compared for them. `probed`: models
    whose deployed file is also checked on the probe images (assert_serves_predicts_class_on_every_probe_image)."""
    test = read_split("test").plain()
    classes, paths, pixels = test.classes, test.paths, pixels_of_the_test_images()
    for model in MODELS:
        scores = evaluated_scores(model, test)
        top_two = np.sort(scores, axis=1)[:, -2:]
        assert (top_two[:, 1] - top_two[:, 0]).min() > 10 * atol, f"{model}: a test image is too close to call"
        evaluated = [line.split(",")[1] for line in (CONFUSION_PLOTS / f"{model}.csv").read_text().splitlines()[1:]]
        assert evaluated == [classes[i] for i in scores.argmax(axis=1)], model

        capsys.readouterr()
        assert predict_cli.main([*paths, "--model", model, "--json", "--top-k", "1"]) == 0
        output = json.loads(capsys.readouterr().out)
        predicted = {p["path"]: p["top"][0]["class"] for p in output["predictions"]}
        if model in deployed_elsewhere:
            assert evaluated == [predicted[p] for p in paths], model
            continue

        assert predict_cli.main(["--deploy", "--model", model]) == 0
        deployed_file = Path(capsys.readouterr().out.strip())
        assert deployed_file == Path(f"models/deploy/{model}.onnx")
        props = {p.key: p.value for p in onnx.load(str(deployed_file)).metadata_props}
        assert json.loads(props["classes"]) == classes and props["model"] == model
        session = ort.InferenceSession(str(deployed_file), providers=list(providers))
        assert [(i.name, i.type) for i in session.get_inputs()] == [(PIXELS, "tensor(uint8)")], model
        assert [o.name for o in session.get_outputs()] == [PROBABILITIES], model
        probabilities = session.run([PROBABILITIES], {PIXELS: pixels})[0]
        one = session.run([PROBABILITIES], {PIXELS: pixels[:1]})[0]  # the batch dimension stays dynamic
        deployed = [classes[i] for i in probabilities.argmax(axis=1)]

        assert evaluated == [predicted[p] for p in paths] == deployed, model
        np.testing.assert_allclose(probabilities, scores, atol=atol, err_msg=model)
        np.testing.assert_allclose(one, probabilities[:1], atol=atol, err_msg=model)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5, err_msg=model)
        if model in probed:
            assert_serves_predicts_class_on_every_probe_image(deployed_file, model)


def test_evaluate_predict_and_the_deployed_file_agree_on_every_test_image_at_fp32(every_model_work, capsys):
    # a head's file and the fine-tuned model's, built two ways, on the probe images too (test_deploy_check.py)
    assert_served_alike(capsys, probed=("logreg", finetune_files.MODEL_NAME))


def same_files(a: Path, b: Path) -> bool:
    """The same relative paths with the same bytes under folders (or files) `a` and `b`."""
    def tree(root: Path) -> dict:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        return {p.relative_to(root): p.read_bytes() for p in files}

    return tree(a) == tree(b)


def test_evaluate_predict_and_the_deployed_file_agree_on_every_test_image_at_int8(every_model_int8_work,
                                                                                every_model, capsys):
    extracted = json.loads(Path("metrics/extract.json").read_text())
    assert extracted["precision"] == "int8" and extracted["computed"] == 0  # `int8_calibrated`'s rows, reused
    # what a fine-tuned model's deploy reads (its ONNX and record, the backbone's preprocessing, the prepared
    # images' bit depth) is byte for byte the fp32 project's: the fp32 test's deploy of it is this one
    for read in (finetune_files.FINETUNE_DIR, backbone_files.META, manifest.PREPARED):
        assert same_files(every_model / read, every_model_int8_work / read), read
    assert_served_alike(capsys, deployed_elsewhere=(finetune_files.MODEL_NAME,))


def test_predict_runs_the_int8_model_the_head_was_trained_on(every_model_int8_work):
    """predict's scores at int8 are the head's on the int8 rows (the deployed file, which carries the int8 backbone
    too, is compared with them in the int8 agreement test above); features of another precision are refused."""
    test = read_split("test")
    results = predict.predict([Path(p) for p in test.paths], "logreg", top_k=1)
    expected = head_files.load("logreg").scores(test.features)
    got = np.array([score for result in results for _, score in result.top])
    np.testing.assert_allclose(got, expected.max(axis=1), atol=1e-4)

    set_params(extract={"precision": "fp32"})  # features of another precision than the head's
    with pytest.raises(UserError, match="extract.precision fp32"):
        predict.predict([Path(test.paths[0])], "logreg", top_k=1)


@pytest.mark.gpu
def test_evaluate_predict_and_the_deployed_file_agree_on_every_test_image_at_fp16(every_model_work, capsys,
                                                                                onnxruntime_cuda):
    set_params(extract={"precision": "fp16", "providers": ["CUDAExecutionProvider"]})
    extract.main()
    train_heads.main()
    evaluate.main()
    # float16 activations: other kernels on other batch shapes round differently, within 1e-3 of probabilities
    assert_served_alike(capsys, providers=("CUDAExecutionProvider",), atol=1e-3)


def test_an_fp16_backbone_joins_a_head_in_one_file(here, tmp_path):
    """The fp16 build path without a GPU: the float16 backbone (float32 in and out) joined to a head is one valid
    file that ONNX Runtime runs, giving the fp32 head's probabilities within float16 rounding."""
    test = read_split("test").plain()
    fp16 = quantize.to_fp16(backbone_files.ONNX.read_bytes())
    preprocessing = backbone_files.load().preprocessing.with_bit_depth(manifest.read_bit_depth())
    for name in ("logreg", "knn"):
        head = head_files.load(name)
        session = cpu_session(deploy_onnx.write(deploy_onnx.build(fp16, head, preprocessing), name, tmp_path))
        probabilities = session.run([PROBABILITIES], {PIXELS: pixels_of_the_test_images()})[0]
        np.testing.assert_allclose(probabilities, head.scores(test.features), atol=5e-2, err_msg=name)


def test_deploy_without_a_model_writes_what_evaluate_chose_the_fine_tuned_model_included(every_model_work, capsys,
                                                                                         caplog):
    best = json.loads(EVALUATE_METRICS.read_text())[BEST_KEY]
    val = {name: served.val_accuracy_of(name) for name in MODELS}  # each model's own record
    assert best == max(MODELS, key=val.get)  # the first of equals: evaluate's order
    with caplog.at_level(logging.INFO):
        assert predict_cli.main(["--deploy"]) == 0
    assert capsys.readouterr().out.strip() == f"models/deploy/{best}.onnx"
    assert f"model {best}: chosen by val accuracy {val[best]:.4f}, the best of the {len(MODELS)} model(s) in " \
           "metrics/evaluate.json" in caplog.text

    # evaluate choosing among the fine-tuned model and the heads it beats on val: it is the one deployed
    beaten = [name for name in sorted(HEADS) if val[name] < val["finetune"]]
    set_params(evaluate={"models": ["finetune", *beaten]})
    evaluate.main()
    assert json.loads(EVALUATE_METRICS.read_text())[BEST_KEY] == "finetune"
    assert "| finetune ★ |" in Path("reports/summary.md").read_text()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert predict_cli.main(["--deploy"]) == 0
    assert capsys.readouterr().out.strip() == "models/deploy/finetune.onnx"
    assert f"model finetune: chosen by val accuracy {val['finetune']:.4f}" in caplog.text
    session = ort.InferenceSession("models/deploy/finetune.onnx", providers=["CPUExecutionProvider"])
    probabilities = session.run([PROBABILITIES], {PIXELS: pixels_of_the_test_images()})[0]
    np.testing.assert_allclose(probabilities, evaluated_scores("finetune", read_split("test").plain()), atol=1e-4)
    assert predict_cli.main([read_split("test").paths[0], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "finetune"


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


def folder_with_a_bad_file(here: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "new"
    shutil.copytree(here / "images" / "3", folder / "threes")
    (folder / "threes" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return folder


def test_a_folder_with_a_bad_file_still_predicts_the_others(here, tmp_path, capsys, caplog):
    folder = folder_with_a_bad_file(here, tmp_path)
    with caplog.at_level(logging.INFO):
        assert predict_cli.main([str(folder), str(tmp_path / "missing.jpg"), "--model", "knn", "--top-k", "2"]) == 1
    output = capsys.readouterr()
    lines = output.out.splitlines()
    good = [line for line in lines if "ERROR" not in line]
    assert len(good) == 6 and all(line.count(" 0.") + line.count(" 1.") == 2 for line in good)
    assert any(line.startswith(f"{folder / 'threes' / 'broken.png'}: ERROR not a decodable image") for line in lines)
    assert f"{tmp_path / 'missing.jpg'}: ERROR no such file or folder" in lines
    assert "2 of 8 input(s) could not be predicted" in output.err
    assert "model knn: named with --model" in caplog.text


def test_the_command_line_json_the_default_model_and_the_exit_status(here, tmp_path):
    """`python -m stages.predict` itself, once: its log, its JSON, and exit status 1 when an input failed."""
    folder = folder_with_a_bad_file(here, tmp_path)
    result = run_cli(str(folder), "--json", "--top-k", "4")
    assert result.returncode == 1, result.stderr
    output = json.loads(result.stdout)
    best = json.loads(EVALUATE_METRICS.read_text())[BEST_KEY]
    assert output["model"] == best and f"model {best}: chosen by val accuracy" in result.stderr
    assert "1 of 7 input(s) could not be predicted" in result.stderr
    predictions = {Path(p["path"]).name: p for p in output["predictions"]}
    assert len(predictions) == 7 and predictions["broken.png"]["error"].startswith("not a decodable image")
    good = [p for name, p in predictions.items() if name != "broken.png"]
    assert all(len(p["top"]) == 4 and {"class", "score"} == set(p["top"][0]) for p in good)


def test_a_pickled_head_cannot_be_deployed_even_when_chosen(every_model_work):
    set_params(heads={"logreg": HEADS["logreg"],  # NearestCentroid: no skl2onnx converter, so it is pickled
                      "centroid": {"type": "sklearn", "estimator": "NearestCentroid", "allow_pickle": True}})
    train_heads.main()
    with pytest.raises(UserError, match=r"head 'centroid' \(named with --model\) is a pickled scikit-learn "
                                        r"estimator.*deployable models: logreg, finetune \(--model NAME\)"):
        predict.deploy("centroid")
    set_params(evaluate={"models": ["centroid"]})
    evaluate.main()
    with pytest.raises(UserError, match=r"head 'centroid' \(the chosen model\) is a pickled scikit-learn estimator"):
        predict.deploy()  # never another model in its place
    assert not Path("models/deploy").exists()


def test_an_unknown_model_lists_the_trained_ones(here):
    for argv in (["images", "--model", "nope"], ["--deploy", "--model", "nope"]):
        with pytest.raises(UserError, match="no trained head 'nope' in models/heads; trained: knn, linear, logreg, "
                                            "mlp"):
            predict_cli.main(argv)


def test_a_head_trained_on_other_features_is_refused(here):
    head = head_files.load("logreg")
    head.meta["features_fingerprint"] = "0" * 64
    with pytest.raises(UserError, match="head 'logreg' was trained on other features.*run `dvc repro`"):
        predict.check_features_match(head, backbone_files.load())


def test_a_head_whose_features_differ_only_in_this_environments_pixels_is_refused_naming_the_remedy(here,
                                                                                                     monkeypatch):
    """Another Pillow, or a decoder installed or missing here, changes only the probe digest: DVC tracks no such
    dependency, so `dvc repro` would do nothing; the message says what differs and what does recompute."""
    from transfer_learning.data import images

    head = head_files.load("logreg")
    predict.check_features_match(head, backbone_files.load())  # the same pixels: served
    monkeypatch.setattr(images, "probe_digest", lambda preprocessing: "f" * 64)
    with pytest.raises(UserError, match=r"head 'logreg' was trained on features of other pixels than this "
                                        r"environment makes: .*`dvc repro` sees nothing to do\. Run "
                                        r"`dvc repro -f extract`.*or install the library versions"):
        predict.check_features_match(head, backbone_files.load())


def test_the_fine_tuned_model_on_images_prepared_otherwise_is_refused(every_model_work):
    meta_file = finetune_files.FINETUNE_DIR / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["preprocessing"]["resize"] += 32
    meta_file.write_text(json.dumps(meta))
    for serve in (lambda: predict.predict([Path(read_split("test").paths[0])], "finetune", top_k=1),
                  lambda: predict.deploy("finetune")):
        with pytest.raises(UserError, match=r"models/finetune was fine-tuned on images prepared otherwise .*"
                                            r"run `dvc repro`"):
            serve()


@pytest.fixture
def heads_only(every_model, tmp_path, monkeypatch) -> Path:
    """A folder with `every_model`'s heads and no fine-tuned model, for the choice's records."""
    work = tmp_path / "project"
    shutil.copytree(every_model / "models" / "heads", work / "models" / "heads")
    (work / "metrics").mkdir()
    monkeypatch.chdir(work)
    return work


def set_val_accuracies(**val_accuracy: float) -> None:
    for name, value in val_accuracy.items():
        meta_file = head_files.HEADS_DIR / name / "head.json"
        meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "val_accuracy": value}))


def test_the_chosen_model_is_evaluates_best_on_val_never_on_test(heads_only):
    set_val_accuracies(knn=0.8, linear=0.6, logreg=0.7, mlp=0.9)
    # test accuracy ranks knn first; val ranks mlp first
    scores = {"knn": {"accuracy": 0.99}, "linear": {"accuracy": 0.3}, "logreg": {"accuracy": 0.5},
              "mlp": {"accuracy": 0.6}}
    EVALUATE_METRICS.write_text(json.dumps({**scores, BEST_KEY: "mlp"}))
    assert served.chosen_model().name == "mlp"
    EVALUATE_METRICS.write_text(json.dumps(scores))  # from before evaluate named its choice: the same rule
    choice = served.chosen_model()
    assert choice.name == "mlp" and "the best of 4 trained model(s) by their own records" in choice.why
    EVALUATE_METRICS.unlink()
    assert served.chosen_model().name == "mlp"
    set_val_accuracies(knn=0.9)  # a tie: the first in evaluate's order (heads alphabetically)
    assert served.chosen_model().name == "knn"


def test_an_out_of_date_evaluate_json_is_an_error_not_a_guess(heads_only):
    set_val_accuracies(knn=0.8, linear=0.6, logreg=0.7, mlp=0.9)
    entries = {name: {"accuracy": 0.5} for name in ("knn", "linear", "logreg", "mlp")}
    EVALUATE_METRICS.write_text(json.dumps({**entries, BEST_KEY: "logreg"}))  # mlp's val accuracy rose since
    with pytest.raises(UserError, match=r"names 'logreg' \(val accuracy 0.7\) as the best on val, and 'mlp' has val "
                                        r"accuracy 0.9 in its own record. metrics/evaluate.json is out of date: run "
                                        r"`dvc repro evaluate`"):
        served.chosen_model()
    EVALUATE_METRICS.write_text(json.dumps({**entries, BEST_KEY: "finetune"}))  # no fine-tuned model here
    with pytest.raises(UserError, match=r"names 'finetune' as the best on val, and it is not trained"):
        served.chosen_model()


def test_an_empty_argument_is_an_error_not_the_current_folder(here, capsys):
    with pytest.raises(SystemExit) as exited:
        predict_cli.main(["images/7", ""])
    output = capsys.readouterr()
    assert exited.value.code == 2
    assert "an image or folder argument is empty" in output.err and output.out == ""


def test_images_given_to_deploy_are_an_error_not_ignored(here, capsys):
    with pytest.raises(SystemExit) as exited:
        predict_cli.main(["images/7", "--deploy"])
    assert exited.value.code == 2 and "--deploy writes the model's ONNX file and predicts nothing" in \
        capsys.readouterr().err
    assert not Path("models/deploy").exists()


def test_damaged_records_are_errors_that_name_the_file(heads_only):
    EVALUATE_METRICS.write_text('{"logreg": {"val_accuracy": 0.9}, "mlp": ')  # cut short
    with pytest.raises(UserError, match=r"evaluate.json is not valid JSON .*`dvc repro evaluate` \(or name the "
                                        r"model: --model\)"):
        served.chosen_model()
    EVALUATE_METRICS.unlink()
    head_json = Path("models/heads/mlp/head.json")
    head_json.write_bytes(head_json.read_bytes()[:-30])
    with pytest.raises(UserError, match=r"models/heads/mlp/head.json is not valid JSON .*`dvc checkout "
                                        r"models/heads/mlp`"):
        served.chosen_model()
