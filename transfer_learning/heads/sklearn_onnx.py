"""A fitted scikit-learn head (scaler + estimator) as one ONNX graph, written with skl2onnx, so that loading it
never unpickles and `predict --deploy` can join it to the backbone.

The graph: float32 features -> standardization with train's mean/scale in float32 (as StandardScaler.transform
computes it for float32 features, and as weights.npz stores them) -> the estimator as skl2onnx converts it -> its
probabilities (or decision scores, [-s, s] for a binary one, as estimator_scores gives them) -> one float32
column per dataset class. Classes absent from training get probability 0, or score -inf for estimators without
probabilities, as Head.scores does for the other heads. A kNN head uses ONNX Runtime's com.microsoft CDist op,
so its graph (and the deploy ONNX built from it) needs ONNX Runtime.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT, OUTPUT = "features", "scores"  # the head file's input (N × feature_dim) and output (N × classes)
TARGET_OPSET = {"": 18, "ai.onnx.ml": 3}


class NoConverter(Exception):
    """skl2onnx cannot write this estimator as ONNX."""


def has_converter(estimator) -> bool:
    from skl2onnx._supported_operators import sklearn_operator_name_map  # the registry skl2onnx itself consults

    return type(estimator) in sklearn_operator_name_map


def _estimator_graph(estimator, feature_dim: int) -> tuple[onnx.ModelProto, int]:
    """skl2onnx's graph of the estimator alone, reading float32 `head_standardized` (scikit-learn's estimators see
    float32 too: the standardized features keep the features' dtype); returns it and its score columns."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.neighbors import KNeighborsClassifier

    options: dict = {"zipmap": False} if hasattr(estimator, "predict_proba") else {}
    if isinstance(estimator, KNeighborsClassifier):  # ONNX Runtime's CDist op: 100× faster than the default Scan loop
        options["optim"] = "cdist"
    try:
        model = to_onnx(estimator, initial_types=[("head_standardized", FloatTensorType([None, feature_dim]))],
                        options=options or None, target_opset=TARGET_OPSET)
        scores = _run(model, np.zeros((1, feature_dim), np.float32))[-1]  # [label, probabilities or scores]
    except Exception as error:  # noqa: BLE001 - skl2onnx and ONNX Runtime raise many types; all mean "no ONNX form"
        raise NoConverter(f"skl2onnx could not convert {type(estimator).__name__}: {error}") from None
    return model, scores.shape[1]


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def _canonical_names(graph: onnx.GraphProto, names: dict[str, str], nodes: list[int]) -> None:
    """Renames every tensor and node in order of appearance: skl2onnx numbers names with process-wide counters,
    so converting the same estimator twice would give other bytes (and DVC a changed output)."""
    def new(name: str) -> str:
        return name if not name or name in (INPUT, OUTPUT) else names.setdefault(name, f"t{len(names)}")

    for value in (*graph.input, *graph.initializer, *graph.value_info, *graph.output):
        value.name = new(value.name)
    for node in graph.node:
        node.input[:] = [new(name) for name in node.input]
        node.output[:] = [new(name) for name in node.output]
        node.name, nodes[0] = f"{node.op_type}_{nodes[0]}", nodes[0] + 1
        for attribute in node.attribute:
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                _canonical_names(subgraph, names, nodes)


def to_onnx_head(estimator, mean: np.ndarray, scale: np.ndarray, class_indices: list[int], n_classes: int) -> bytes:
    """The serialized head graph; raises NoConverter when the estimator has no ONNX form."""
    if not has_converter(estimator):
        raise NoConverter(f"skl2onnx has no converter for {type(estimator).__name__}")
    feature_dim = len(mean)
    inner, own_width = _estimator_graph(estimator, feature_dim)
    own_output = inner.graph.output[-1].name
    probabilistic = hasattr(estimator, "predict_proba")

    nodes = [helper.make_node("Sub", [INPUT, "head_mean"], ["head_centered"]),
             helper.make_node("Div", ["head_centered", "head_scale"], ["head_standardized"]),
             *inner.graph.node]
    nodes.append(helper.make_node("Cast", [own_output], ["head_own32"], to=TensorProto.FLOAT))
    own = "head_own32"
    if own_width == 1 and len(class_indices) == 2:  # a binary decision function: [-s, s], as estimator_scores
        nodes += [helper.make_node("Neg", [own], ["head_own_neg"]),
                  helper.make_node("Concat", ["head_own_neg", own], ["head_own_both"], axis=1)]
        own = "head_own_both"
    # own columns (estimator.classes_) -> dataset columns: a 0/1 matrix, plus 0 (or -inf) where a class is absent
    spread = np.zeros((len(class_indices), n_classes), np.float32)
    spread[np.arange(len(class_indices)), class_indices] = 1.0
    absent = np.full(n_classes, 0.0 if probabilistic else -np.inf, np.float32)
    absent[class_indices] = 0.0
    nodes += [helper.make_node("MatMul", [own, "head_spread"], ["head_spread_scores"]),
              helper.make_node("Add", ["head_spread_scores", "head_absent"], [OUTPUT])]
    initializers = [numpy_helper.from_array(np.asarray(mean, np.float32), "head_mean"),
                    numpy_helper.from_array(np.asarray(scale, np.float32), "head_scale"),
                    numpy_helper.from_array(spread, "head_spread"), numpy_helper.from_array(absent, "head_absent")]
    graph = helper.make_graph(
        nodes, f"head_{type(estimator).__name__}",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", feature_dim])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", n_classes])],
        [*inner.graph.initializer, *initializers])
    # opset imports sorted by domain: skl2onnx lists them in an order that varies between processes (a set), and
    # the same head must give the same bytes
    opsets = sorted(inner.opset_import, key=lambda opset: opset.domain)
    model = helper.make_model(graph, opset_imports=opsets, ir_version=inner.ir_version,
                              functions=list(inner.functions))
    _canonical_names(model.graph, {}, [0])
    onnx.checker.check_model(model)
    return model.SerializeToString()
