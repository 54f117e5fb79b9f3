"""One ONNX file for deployment without this repo: uint8 pixels -> normalization -> the model -> probabilities,
with the class names and the resize/crop it expects in its metadata. Every deployed file, head or fine-tuned
model, takes the same input and gives the same output.

A layered head is written as ONNX ops directly (Sub, Div, Gemm, Relu, Softmax) from its saved layers; a
scikit-learn head already is an ONNX graph (head.onnx), brought to the backbone's opset. Either is joined to
the backbone at extract.precision with onnx.compose, so deploying never re-exports the backbone. The fine-tuned
model (models/finetune/model.onnx: normalized floats in) gets the same normalization in front. A head without
probabilities (e.g. LinearSVC) outputs its decision scores under the same output name; its metadata says which.

Before a file is written, it is run on the probe images (data/probes.py) as uint8 pixels from the evaluation
preprocessing (data/pixels.py): its own normalization (the backbone's input tensor inside it) must be that module's
within one grey level, and its class on every probe the one predict gives (`check_preprocessing`). The figures go
into its metadata.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, compose, helper, numpy_helper, version_converter

from transfer_learning.backbone.onnx_export import INPUT, OUTPUT, cpu_session
from transfer_learning.common.atomic import atomic_path
from transfer_learning.common.errors import UserError
from transfer_learning.data.decode import BadImage
from transfer_learning.data.images import Preprocessing
from transfer_learning.data.pixels import NormalizeTable, evaluation_pixels
from transfer_learning.data.probes import probe_files
from transfer_learning.heads.files import Head
from transfer_learning.heads.sklearn_onnx import INPUT as HEAD_INPUT
from transfer_learning.heads.sklearn_onnx import OUTPUT as HEAD_OUTPUT

DEPLOY_DIR = Path("models/deploy")
PIXELS, PROBABILITIES = "pixels", "probabilities"
CHECK = "preprocessing_check"  # the metadata key of check_preprocessing's figures


def _model(nodes: list, inputs: list, outputs: list, initializers: dict[str, np.ndarray],
           like: onnx.ModelProto) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "part", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in initializers.items()])
    return helper.make_model(graph, opset_imports=list(like.opset_import), ir_version=like.ir_version)


def normalization_model(preprocessing: Preprocessing, like: onnx.ModelProto) -> onnx.ModelProto:
    """uint8 NCHW pixels -> the backbone's float input: data/pixels.py's NormalizeTable as operators (x / 255, minus
    the mean, over the std, in float32); check_preprocessing holds them equal on the probe images."""
    size = preprocessing.crop
    nodes = [
        helper.make_node("Cast", [PIXELS], ["deploy_float"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["deploy_float", "deploy_255"], ["deploy_unit"]),
        helper.make_node("Sub", ["deploy_unit", "deploy_mean"], ["deploy_centered"]),
        helper.make_node("Div", ["deploy_centered", "deploy_std"], [INPUT]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info(PIXELS, TensorProto.UINT8, ["batch", 3, size, size])],
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 3, size, size])],
        {"deploy_255": np.array(255.0), "deploy_mean": np.array(preprocessing.mean).reshape(1, -1, 1, 1),
         "deploy_std": np.array(preprocessing.std).reshape(1, -1, 1, 1)},
        like,
    )


def head_model(head: Head, feature_dim: int, like: onnx.ModelProto) -> onnx.ModelProto:
    """features -> standardize -> Linear (+ReLU between) -> softmax over all classes, as Head.scores does."""
    layers = head.layers
    n_classes = len(head.classes)
    initializers = {"head_mean": head.arrays["mean"], "head_scale": head.arrays["scale"]}
    nodes = [helper.make_node("Sub", [OUTPUT, "head_mean"], ["head_centered"]),
             helper.make_node("Div", ["head_centered", "head_scale"], ["head_x0"])]
    for i, (weight, bias) in enumerate(layers):
        last = i == len(layers) - 1
        if last and len(head.meta["class_indices"]) < n_classes:  # classes absent from training get 0
            full_w = np.zeros((n_classes, weight.shape[1]), np.float32)
            full_b = np.full(n_classes, -np.inf, np.float32)
            full_w[head.meta["class_indices"]], full_b[head.meta["class_indices"]] = weight, bias
            weight, bias = full_w, full_b
        initializers |= {f"head_w{i}": weight, f"head_b{i}": bias}
        out = "head_logits" if last else f"head_h{i}"
        nodes.append(helper.make_node("Gemm", [f"head_x{i}", f"head_w{i}", f"head_b{i}"], [out], transB=1))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"head_x{i + 1}"]))
    nodes.append(helper.make_node("Softmax", ["head_logits"], [PROBABILITIES], axis=1))
    return _model(
        nodes,
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", feature_dim])],
        [helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["batch", n_classes])],
        initializers,
        like,
    )


def onnx_head_model(head: Head, like: onnx.ModelProto) -> onnx.ModelProto:
    """head.onnx reading the backbone's OUTPUT and writing PROBABILITIES, at the backbone's opset and IR version."""
    model = onnx.load_from_string(head.onnx_bytes)
    target = next(o.version for o in like.opset_import if o.domain in ("", "ai.onnx"))
    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current != target:
        try:
            model = version_converter.convert_version(model, target)
        except Exception as error:  # noqa: BLE001 - the converter raises bare RuntimeErrors
            raise UserError(f"head {head.name!r} (opset {current}) cannot be brought to the backbone's opset {target} "
                            f"({error}); set export.opset to {current} and run `dvc repro export`") from None
    model = compose.add_prefix(model, "head_")  # no name of the head's graph can clash with the backbone's
    graph = model.graph
    for node in graph.node:
        node.input[:] = [OUTPUT if name == f"head_{HEAD_INPUT}" else name for name in node.input]
        node.output[:] = [PROBABILITIES if name == f"head_{HEAD_OUTPUT}" else name for name in node.output]
    graph.input[0].name, graph.output[0].name = OUTPUT, PROBABILITIES
    model.ir_version = like.ir_version
    return model


def _used_domains(graph: onnx.GraphProto) -> set[str]:
    domains = set()
    for node in graph.node:
        domains.add(node.domain)
        for attribute in node.attribute:
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                domains |= _used_domains(subgraph)
    return domains


def used_opsets_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` importing only the operator sets its nodes use (and the default one). ONNX Runtime's optimizer, which
    the int8 quantization runs first, declares every domain it knows (ai.onnx.ml 5 among them, no node of it), and
    onnx.compose refuses to join two models that import one domain at different versions."""
    used = _used_domains(model.graph) | {"", "ai.onnx"}
    for function in model.functions:
        used |= {function.domain} | {node.domain for node in function.node}
    kept = [opset for opset in model.opset_import if opset.domain in used]
    if len(kept) < len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(kept)
    return model


def topologically_sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every node after the nodes it reads from, the order onnx.checker requires. The fp16 conversion
    (onnxruntime.transformers.float16, keep_io_types) appends the Cast of the graph input at the end, which
    ONNX Runtime accepts and the checker of the joined file does not. An already sorted graph keeps its order."""
    graph = model.graph
    produced = {name for node in graph.node for name in node.output if name}
    ready = {name for node in graph.node for name in node.input if name and name not in produced}
    remaining, ordered = list(graph.node), []
    while remaining:
        waiting = []
        for node in remaining:
            if all(not name or name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(remaining):
            raise ValueError(f"graph {graph.name!r} has a cycle through {[n.name for n in waiting][:5]}")
        remaining = waiting
    if any(a is not b for a, b in zip(ordered, graph.node)):
        copies = [onnx.NodeProto.FromString(node.SerializeToString()) for node in ordered]
        del graph.node[:]
        graph.node.extend(copies)
    return model


def joinable(first: onnx.ModelProto, second: onnx.ModelProto, second_name: str) -> None:
    """Raises a UserError when the two models need one operator set at two versions (after used_opsets_only)."""
    versions = {opset.domain or "ai.onnx": opset.version for opset in first.opset_import}
    clashes = [f"{opset.domain or 'ai.onnx'} {versions[opset.domain or 'ai.onnx']} vs {opset.version}"
               for opset in second.opset_import
               if versions.get(opset.domain or "ai.onnx", opset.version) != opset.version]
    if clashes:
        raise UserError(f"{second_name} cannot be joined to the backbone in one file: both use an ONNX operator set "
                        f"beyond the standard one, at other versions ({'; '.join(clashes)}); predict still serves it "
                        "in two steps (`python -m stages.predict IMAGES --model NAME`)")


def with_pixels_input(model: onnx.ModelProto, preprocessing: Preprocessing,
                      outputs: list[str] | None = None) -> onnx.ModelProto:
    """`model` (normalized float INPUT in) with uint8 PIXELS in: the normalization joined in front."""
    return compose.merge_models(normalization_model(preprocessing, model), model, io_map=[(INPUT, INPUT)],
                                outputs=outputs)


def described(model: onnx.ModelProto, name: str, classes: list[str], preprocessing: Preprocessing,
              probabilistic: bool) -> onnx.ModelProto:
    """`model` with what a user of the file needs in its metadata, checked."""
    model.graph.name = name
    helper.set_model_props(model, {
        "model": name,
        "classes": json.dumps(classes),
        "preprocessing": json.dumps(preprocessing.to_json()),
        "input": f"{PIXELS}: uint8 N×3×{preprocessing.crop}×{preprocessing.crop}, RGB, resized so the short side "
                 f"is {preprocessing.resize} ({preprocessing.interpolation}) then center-cropped",
        "output": PROBABILITIES + (": probabilities" if probabilistic else
                                   ": decision scores (this head has no probabilities); the class is the argmax"),
    })
    onnx.checker.check_model(model)
    return model


def build(backbone_onnx: Path | bytes, head: Head, preprocessing: Preprocessing) -> onnx.ModelProto:
    """`backbone_onnx`: models/backbone.onnx, or the checked bytes of the backbone at extract.precision."""
    if isinstance(backbone_onnx, bytes):
        backbone = onnx.load_from_string(backbone_onnx)
    else:
        backbone = onnx.load(str(backbone_onnx))
    backbone = topologically_sorted(used_opsets_only(backbone))
    if head.onnx_bytes is not None:
        head_part = used_opsets_only(onnx_head_model(head, backbone))
        joinable(backbone, head_part, f"head {head.name!r}")
    else:
        feature_dim = backbone.graph.output[0].type.tensor_type.shape.dim[1].dim_value or int(head.arrays["mean"].size)
        head_part = head_model(head, feature_dim, backbone)
    model = compose.merge_models(with_pixels_input(backbone, preprocessing), head_part, io_map=[(OUTPUT, OUTPUT)])
    return described(model, head.name, head.classes, preprocessing, head.probabilistic)


def build_finetuned(model_onnx: bytes, name: str, classes: list[str], preprocessing: Preprocessing
                    ) -> onnx.ModelProto:
    """The fine-tuned model's ONNX (normalized images in, probabilities and logits out) with pixels in and
    probabilities out, like every deployed file."""
    model = used_opsets_only(onnx.load_from_string(model_onnx))
    return described(with_pixels_input(model, preprocessing, outputs=[PROBABILITIES]), name, classes, preprocessing,
                     probabilistic=True)


def probe_pixels(preprocessing: Preprocessing) -> tuple[list[str], np.ndarray]:
    """The probe images as a deployed file takes them: uint8 N×3×crop×crop from data/pixels.py (a grey plane
    repeated), with their names. A probe this machine cannot decode is left out (the caller says how many ran)."""
    names, pixels = [], []
    for path in probe_files():
        try:
            plane_or_rgb = evaluation_pixels(path.read_bytes(), preprocessing)
        except BadImage:
            continue
        names.append(path.name)
        pixels.append(np.broadcast_to(plane_or_rgb, (3, *plane_or_rgb.shape[1:])))
    return names, np.ascontiguousarray(np.stack(pixels))


def check_preprocessing(model: onnx.ModelProto, preprocessing: Preprocessing,
                        reference: Callable[[np.ndarray], np.ndarray]) -> dict:
    """Runs `model` (a deploy file: PIXELS in) on the probe images with ONNX Runtime on the CPU. Its normalized input
    must equal data/pixels.py's NormalizeTable within one grey level, and on every probe its class must be one
    `reference` (uint8 pixels -> the scores predict serves) ranks first, up to float rounding. Returns the figures;
    a UserError naming the probe otherwise."""
    names, pixels = probe_pixels(preprocessing)
    expected_inputs = NormalizeTable.of(preprocessing).inputs(pixels)
    probed = onnx.ModelProto()
    probed.CopyFrom(model)
    probed.graph.output.append(helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, None))  # the normalized input
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    scores, inputs = session.run([PROBABILITIES, INPUT], {PIXELS: pixels})
    std = np.asarray(preprocessing.std, np.float64).reshape(1, -1, 1, 1)
    grey_levels = np.abs(inputs.astype(np.float64) - expected_inputs) * std * 255.0
    worst = int(grey_levels.reshape(len(names), -1).max(axis=1).argmax())
    if grey_levels.max() > 1.0:
        raise UserError(f"the deploy file's normalization differs from the pipeline's by {grey_levels.max():.3g} grey "
                        f"levels on probe image {names[worst]} (at most 1 is allowed): it would not see the pixels "
                        "the model was evaluated on")
    served = reference(pixels)
    for name, got, wanted in zip(names, scores, served):
        finite = wanted[np.isfinite(wanted)]
        tolerance = 1e-4 * max(1.0, float(np.abs(finite).max(initial=0.0)))  # ties within float rounding
        if not wanted[int(np.argmax(got))] >= wanted.max() - tolerance:
            raise UserError(f"the deploy file gives probe image {name} class index {int(np.argmax(got))}, predict "
                            f"gives {int(np.argmax(wanted))}: the file does not serve what predict serves")
    return {"probe_images": len(names), "probe_images_not_decodable_here": len(probe_files()) - len(names),
            "same_class": len(names), "max_normalization_difference_grey_levels": round(float(grey_levels.max()), 4)}


def with_check(model: onnx.ModelProto, figures: dict) -> onnx.ModelProto:
    """`model` with check_preprocessing's figures in its metadata."""
    model.metadata_props.append(onnx.StringStringEntryProto(key=CHECK, value=json.dumps(figures)))
    return model


def write(model: onnx.ModelProto, name: str, directory: Path = DEPLOY_DIR) -> Path:
    path = directory / f"{name}.onnx"
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
        cpu_session(tmp)  # fails here, not at the user's, if ONNX Runtime cannot load it
    return path
