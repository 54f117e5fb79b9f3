"""Predict classes of new images with the ONNX backbone and a trained head, or write one standalone ONNX file
(`python -m stages.predict`, not a DVC stage).

Folders are searched recursively for images. A file that cannot be read is reported, and the others are still
predicted. The default model, served by predict and written by --deploy, is the one evaluate chose: the best val
accuracy (evaluate/choice.py; the test split only reports). ONNX Runtime runs on extract.providers.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transfer_learning.backbone import files as backbone_files
from transfer_learning.common.errors import UserError
from transfer_learning.common.hashing import sha256_bytes
from transfer_learning.data import manifest
from transfer_learning.data.decode import BadImage
from transfer_learning.data.formats import IMAGE_EXTENSIONS
from transfer_learning.data.images import Preprocessing
from transfer_learning.data.pixels import NormalizeTable, evaluation_pixels
from transfer_learning.deploy.served import model_to_serve, recorded_meta, trained_models
from transfer_learning.features import quantize
from transfer_learning.features.fingerprint import digest, fingerprint_spec, read_about
from transfer_learning.features.runtime import FeatureRunner
from transfer_learning.features.store import resolve_store
from transfer_learning.finetune import files as finetune_files
from transfer_learning.heads import files as head_files
from transfer_learning.params import load_params

log = logging.getLogger("predict")
PROBE_BATCH = 32  # images per ONNX Runtime call of deploy's reference on the probe images


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None


def image_files(inputs: list[str]) -> tuple[list[Path], list[Prediction]]:
    """The image files named or found under the folders named; paths that do not exist become errors."""
    files, missing = [], []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                missing.append(Prediction(given, error=f"no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder"))
            files += found
        elif path.is_file():
            files.append(path)
        else:
            missing.append(Prediction(given, error="no such file or folder"))
    return files, missing


def check_features_match(head: head_files.Head, backbone: backbone_files.Backbone) -> bytes:
    """A head only makes sense on the features it was trained on: same ONNX backbone, preprocessing, dtype,
    precision. Returns the checked bytes to run: models/backbone.onnx, or its int8/fp16 conversion at
    extract.precision (the cached file, its sha256 verified, or rebuilt exactly as extract builds it)."""
    params = load_params(resolve_estimators=False, resolve_backbone=False).extract
    preprocessing = backbone.preprocessing.with_bit_depth(manifest.read_bit_depth())
    try:
        onnx_bytes = backbone_files.ONNX.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{backbone_files.ONNX} is missing: run `dvc repro export`") from None
    onnx_bytes = quantize.backbone_at_precision(params, onnx_bytes, manifest.read(), preprocessing)
    spec = fingerprint_spec(sha256_bytes(onnx_bytes), preprocessing, params.dtype, params.precision)
    trained_on = head.meta["features_fingerprint"]
    if trained_on == digest(spec):
        return onnx_bytes
    if only_the_pixels_differ(trained_on, spec, resolve_store(params.store)):
        raise UserError(f"head {head.name!r} was trained on features of other pixels than this environment makes: "
                        "its libraries decode or resize the probe images (transfer_learning/data/probes.py) "
                        "otherwise than the one the features were computed in (another Pillow, a decoder such as "
                        "imagecodecs installed or missing); the backbone, preprocessing, dtype and precision are "
                        "unchanged, so `dvc repro` sees nothing to do. Run `dvc repro -f extract` and then `dvc repro` "
                        "to recompute the features here, or install the library versions they were computed with")
    raise UserError(f"head {head.name!r} was trained on other features than {backbone_files.ONNX} gives now at "
                    f"extract.precision {params.precision} (the backbone, cut, pooling, preprocessing, dtype or "
                    "precision changed): run `dvc repro`. If `dvc repro` finds nothing to do, this environment's "
                    "libraries decode images to other pixels than the one the features were computed in: run "
                    "`dvc repro -f extract`, or install the same library versions")


def only_the_pixels_differ(trained_on: str, spec: dict, store: Path) -> bool:
    """Whether the features `trained_on` (a fingerprint) differ from those `spec` describes only in the probe digest
    (data/probes.py): what the libraries make of the images, which no DVC dependency tracks. Known from the store
    folder's record of its spec (fingerprint.read_about); False when the store no longer holds it."""
    recorded = read_about(store / trained_on)
    if recorded is None:
        return False
    return digest({**recorded["fingerprint_spec"], "pixels": spec["pixels"]}) == digest(spec)


def load_pixels(path: Path, preprocessing: Preprocessing) -> np.ndarray:
    """uint8 3×crop×crop: the evaluation pixels extract computes features from (data/pixels.py). numpy, not torch:
    serving runs ONNX Runtime only, and a predict process that never imports torch starts seconds sooner."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadImage(f"cannot read: {error.strerror or error}") from None
    pixels = evaluation_pixels(data, preprocessing)
    return np.ascontiguousarray(np.broadcast_to(pixels, (3, *pixels.shape[1:])))


class TwoStepPredictor:
    """models/backbone.onnx with ONNX Runtime, then the head on the features."""

    def __init__(self, head: head_files.Head, backbone_onnx: bytes, batch_size: int, providers: list[str]):
        self.head = head
        self.runner = FeatureRunner(backbone_onnx, providers, batch_size)

    def __call__(self, pixels: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
        return self.head.scores(self.runner(NormalizeTable.of(preprocessing).inputs(pixels)))


def check_finetuned_preprocessing(preprocessing: Preprocessing) -> None:
    """The fine-tuned model takes images prepared as it was trained on them: the same resize, crop, normalization
    and decoding as `preprocessing`, what predict gives every model."""
    recorded = finetune_files.read_meta().get("preprocessing")
    if recorded is None or Preprocessing.from_json(recorded) != preprocessing:
        raise UserError(f"{finetune_files.FINETUNE_DIR} was fine-tuned on images prepared otherwise than "
                        f"{backbone_files.ONNX} and data/prepared now prepare them (the backbone, its preprocessing or "
                        "data.bit_depth changed): run `dvc repro`")


class FineTunedPredictor:
    """models/finetune/model.onnx, once it matches the sha256 in meta.json: images in, probabilities out."""

    def __init__(self, batch_size: int, providers: list[str], preprocessing: Preprocessing):
        check_finetuned_preprocessing(preprocessing)
        self.classes = finetune_files.read_meta()["classes"]
        self.runner = FeatureRunner(finetune_files.verified_bytes(finetune_files.ONNX), providers, batch_size)

    def __call__(self, pixels: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
        return self.runner(NormalizeTable.of(preprocessing).inputs(pixels))


def predictor_for(model: str, backbone: backbone_files.Backbone, preprocessing: Preprocessing, batch_size: int):
    """(predictor, class names)"""
    providers = load_params(resolve_estimators=False, resolve_backbone=False).extract.providers
    if model == finetune_files.MODEL_NAME:
        predictor = FineTunedPredictor(batch_size, providers, preprocessing)
        return predictor, predictor.classes
    head = head_files.load(model)
    backbone_onnx = check_features_match(head, backbone)
    return TwoStepPredictor(head, backbone_onnx, batch_size, providers), head.classes


def predict(files: list[Path], model: str, top_k: int, batch_size: int = 32) -> list[Prediction]:
    backbone = backbone_files.load()
    preprocessing = backbone.preprocessing.with_bit_depth(manifest.read_bit_depth())
    predictor, classes = predictor_for(model, backbone, preprocessing, batch_size)
    results = [Prediction(str(path)) for path in files]
    for start in range(0, len(files), batch_size):
        batch, positions = [], []
        for i in range(start, min(start + batch_size, len(files))):
            try:
                batch.append(load_pixels(files[i], preprocessing))
                positions.append(i)
            except BadImage as error:
                results[i].error = str(error)
        if not batch:
            continue
        scores = predictor(np.stack(batch), preprocessing)
        for row, i in zip(scores, positions):
            # a class absent from training has no score (-inf) for heads without probabilities
            best = [c for c in np.argsort(-row, kind="stable") if np.isfinite(row[c])][:top_k]
            results[i].top = [(classes[c], float(row[c])) for c in best]
    return results


def deploy(named: str | None = None) -> Path:
    """models/deploy/<model>.onnx of `named` (--model), else of the chosen model: uint8 pixels in, probabilities
    out, whichever the model."""
    from transfer_learning.deploy import onnx as deploy_onnx  # onnx (and its checker): only when a file is written

    model = model_to_serve(named)
    backbone = backbone_files.load()
    preprocessing = backbone.preprocessing.with_bit_depth(manifest.read_bit_depth())  # recorded in its metadata
    cpu = ["CPUExecutionProvider"]  # the check runs the file on the CPU: the reference too, to compare like with like
    if model == finetune_files.MODEL_NAME:
        check_finetuned_preprocessing(preprocessing)
        built = deploy_onnx.build_finetuned(finetune_files.verified_bytes(finetune_files.ONNX), model,
                                            finetune_files.read_meta()["classes"], preprocessing)
        reference = FineTunedPredictor(PROBE_BATCH, cpu, preprocessing)
    else:
        head = head_files.load(model)
        if head.meta["format"] == head_files.PICKLE:
            deployable = [n for n in trained_models() if n == finetune_files.MODEL_NAME
                          or recorded_meta(n)["format"] != head_files.PICKLE]
            how = "named with --model" if named else "the chosen model"
            raise UserError(f"head {model!r} ({how}) is a pickled scikit-learn estimator (allow_pickle: true), which "
                            f"has no ONNX form; deployable models: {', '.join(deployable) or 'none'} (--model NAME)")
        backbone_onnx = check_features_match(head, backbone)
        built = deploy_onnx.build(backbone_onnx, head, preprocessing)
        reference = TwoStepPredictor(head, backbone_onnx, PROBE_BATCH, cpu)
    figures = deploy_onnx.check_preprocessing(built, preprocessing,
                                              lambda pixels: reference(pixels, preprocessing))
    log.info("deploy check on %d probe images: the file's normalization is the pipeline's within %.2g grey levels, "
             "its class is predict's on every one%s", figures["probe_images"],
             figures["max_normalization_difference_grey_levels"],
             f" ({figures['probe_images_not_decodable_here']} probe images not decodable here)"
             if figures["probe_images_not_decodable_here"] else "")
    path = deploy_onnx.write(deploy_onnx.with_check(built, figures), model)
    log.info("deployed %s to %s", model, path)
    return path


def print_text(results: list[Prediction], probabilistic: bool) -> None:
    what = "" if probabilistic else " (score)"
    for result in results:
        if result.error:
            print(f"{result.path}: ERROR {result.error}")
        else:
            print(f"{result.path}: " + ", ".join(f"{name} {value:.3f}{what}" for name, value in result.top))


def report(results: list[Prediction], model: str, as_json: bool) -> int:
    """Prints the predictions (text or JSON); returns the exit status: 1 when any input could not be predicted."""
    probabilistic = model == finetune_files.MODEL_NAME or head_files.load(model).probabilistic
    if as_json:
        print(json.dumps({"model": model, "probabilities": probabilistic, "predictions": [
            {"path": r.path, "error": r.error} if r.error else
            {"path": r.path, "top": [{"class": c, "score": s} for c, s in r.top]} for r in results]}, indent=2))
    else:
        print_text(results, probabilistic)
    failed = [r for r in results if r.error]
    if failed:
        print(f"{len(failed)} of {len(results)} input(s) could not be predicted", file=sys.stderr)
    return 1 if failed else 0
