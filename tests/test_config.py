"""params.yaml validation: every problem fails before any work, naming the dotted key and the valid choices."""
from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys
import typing
import warnings
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from tests.conftest import REPO
from transfer_learning import params as config
from transfer_learning.common.dvc_outputs import dvc_outputs
from transfer_learning.common.errors import UserError
from transfer_learning.evaluate.report import BEST_KEY
from transfer_learning.finetune import files as finetune_files
from transfer_learning.params import load_params



def invalid(project, **sections) -> str:
    """Write params.yaml with these overrides, load it, and return the UserError's message."""
    project.params(**sections)
    with pytest.raises(UserError) as caught:
        load_params()
    message = str(caught.value)
    assert "params.yaml" in message
    return message


def assert_read_as_written(raw, validated, where="") -> None:
    """Every value params.yaml holds is the value the stages get: nothing dropped, coerced or defaulted over."""
    if isinstance(raw, dict):
        for key, value in raw.items():
            assert_read_as_written(value, validated[key], f"{where}.{key}".lstrip("."))
    elif isinstance(raw, list):
        assert len(raw) == len(validated), where
        for i, (value, got) in enumerate(zip(raw, validated)):
            assert_read_as_written(value, got, f"{where}.{i}")
    elif where == "backbone.weights" and str(raw).lower() == "none":
        assert validated is None
    else:
        assert validated == raw and type(validated) in (type(raw), float), (where, raw, validated)


def test_repo_params_yaml_validates_and_is_read_as_written():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert_read_as_written(raw, load_params(REPO / "params.yaml").model_dump())


def test_fixture_params_validate_and_are_read_as_written(project):
    assert_read_as_written(yaml.safe_load(Path("params.yaml").read_text()), load_params().model_dump())


def test_unknown_top_level_key(project):
    message = invalid(project, dataa={"source": "digits"})
    assert "dataa: unknown key" in message
    for key in ("data", "backbone", "export", "extract", "heads", "finetune", "evaluate"):
        assert key in message


def test_unknown_nested_key(project):
    message = invalid(project, backbone={"cutt": 3})
    assert "backbone.cutt: unknown key" in message
    for key in ("arch", "weights", "weights_path", "cut", "pool"):
        assert key in message.split("valid keys here:")[1]


def test_unknown_deeply_nested_key(project):
    message = invalid(project, finetune={"augment": {"hflipp": True}})
    assert "finetune.augment.hflipp: unknown key" in message
    assert "hflip" in message.split("valid keys here:")[1]


def test_unknown_key_inside_a_head_names_the_key_and_lists_valid_ones(project):
    message = invalid(project, heads={"knn": {"n_neighbours": 5}})
    assert "heads.knn.n_neighbours: unknown key" in message
    valid = message.split("valid keys here:")[1]
    for key in ("estimator", "params", "grid"):
        assert key in valid


def test_wrong_type_names_the_key(project):
    message = invalid(project, data={"per_class": "many"})
    assert "data.per_class" in message and "'many'" in message


@pytest.mark.parametrize("value", ["many", 0, -3, 2.5, "300", True, [300]])
def test_a_per_class_that_is_not_auto_a_count_or_null_names_the_key_and_the_valid_values(project, value):
    message = invalid(project, data={"per_class": value})
    problems = message.splitlines()[1:]
    assert len(problems) == 1 and problems[0].startswith("  data.per_class: valid: auto (300 per class for "
                                                         "fashion-mnist and digits, every image of a folder or CSV)")
    assert "null (every image)" in problems[0] and f"(got {value!r})" in problems[0]


@pytest.mark.parametrize("value, words", [(0, "greater than or equal to 1"), (-1, "greater than or equal to 1"),
                                          ("8", "valid integer"), (8.5, "valid integer"), (None, "valid integer")])
def test_a_min_side_that_is_not_a_positive_count_names_the_key(project, value, words):
    message = invalid(project, data={"min_side": value})
    assert f"data.min_side: Input should be a {words}" in message or f"data.min_side: Input should be {words}" \
        in message, message


@pytest.mark.parametrize("source, per_class, cap", [
    ("fashion-mnist", "auto", 300), ("digits", "auto", 300), ("photos", "auto", None), ("list.csv", "auto", None),
    ("photos", 50, 50), ("fashion-mnist", 50, 50), ("fashion-mnist", None, None), ("photos", None, None)])
def test_per_class_auto_caps_only_the_built_in_sources(project, source, per_class, cap):
    (project.root / "photos").mkdir()
    (project.root / "list.csv").write_text("path,label\n")
    project.params(data={"source": source, "per_class": per_class})
    assert load_params().data.cap == cap


def test_wrong_value_for_a_union_names_the_key_as_written(project):
    message = invalid(project, finetune={"unfreeze": "some"})
    assert "finetune.unfreeze:" in message and "'all' or 'auto'" in message
    keys = [line.split(":")[0].strip() for line in message.splitlines()[1:]]
    assert set(keys) == {"finetune.unfreeze"}, keys  # no pydantic member names such as 'constrained-int'


def test_unknown_arch_lists_valid_choices(project):
    message = invalid(project, backbone={"arch": "resnet999"})
    assert "backbone.arch" in message and "'resnet999'" in message
    assert "resnet18" in message and "mobilenet_v2" in message


def test_unknown_weights_lists_the_archs_weights(project):
    message = invalid(project, backbone={"weights": "IMAGENET1K_V9"})
    assert "backbone.weights" in message and "IMAGENET1K_V9" in message
    assert "IMAGENET1K_V1" in message and "IMAGENET1K_V2" in message


@pytest.mark.parametrize("spelling", ["none", "None", "NONE", None])
def test_weights_none_means_random_init(project, spelling):
    project.params(backbone={"weights": spelling})
    assert load_params().backbone.weights is None


def test_cut_given_as_a_digit_string_is_a_block_count(project):
    project.params(backbone={"cut": "3"})
    cut = load_params().backbone.cut
    assert cut == 3 and isinstance(cut, int)


def test_cut_name_stays_a_string(project):
    project.params(backbone={"cut": "features.10.add"})
    assert load_params().backbone.cut == "features.10.add"


def test_missing_source_folder_names_data_source(project):
    message = invalid(project, data={"source": "no/such/folder"})
    assert "data.source" in message and "no/such/folder" in message


def test_missing_source_csv_names_data_source(project):
    message = invalid(project, data={"source": "no/such/list.csv"})
    assert "data.source" in message and "list.csv" in message


def test_existing_folder_and_csv_sources_validate(project):
    (project.root / "images").mkdir()
    (project.root / "list.csv").write_text("path,label\n")
    project.params(data={"source": "images"})
    assert load_params().data.source == "images"
    project.params(data={"source": "list.csv"})
    assert load_params().data.source == "list.csv"


@pytest.mark.parametrize("val, test", [(0.5, 0.5), (0.7, 0.4)])
def test_fractions_must_leave_training_data(project, val, test):
    message = invalid(project, data={"val_fraction": val, "test_fraction": test})
    assert "data" in message and "val_fraction" in message and "test_fraction" in message


def estimator_error(project, estimator: str, **head) -> str:
    """The one line naming heads.knn.estimator, which also says what is valid."""
    message = invalid(project, heads={"knn": {"estimator": estimator, **head}})
    lines = [line for line in message.splitlines()[1:]]
    assert len(lines) == 1 and lines[0].startswith("  heads.knn.estimator: "), message
    return lines[0]


def test_estimator_not_in_sklearn_names_the_key_and_the_valid_forms(project):
    line = estimator_error(project, "sklearn.nothing.Foo")
    assert "'sklearn.nothing.Foo' is not a scikit-learn classifier" in line
    listed = line.split("classifiers:")[1]
    assert "trusted_modules" in line and "KNeighborsClassifier" in listed and "LinearSVC" in listed


def test_sklearn_estimator_that_is_not_a_classifier_is_refused(project):
    line = estimator_error(project, "sklearn.preprocessing.StandardScaler")
    assert "'sklearn.preprocessing.StandardScaler' is not a scikit-learn classifier" in line


def test_sklearn_classifier_under_a_wrong_module_gets_its_path(project):
    line = estimator_error(project, "sklearn.svm.KNeighborsClassifier")
    assert "write KNeighborsClassifier or sklearn.neighbors.KNeighborsClassifier" in line


def test_estimator_that_cannot_be_constructed_is_a_params_error(project):
    line = estimator_error(project, "sklearn.ensemble.StackingClassifier")  # needs its `estimators`
    assert "StackingClassifier() failed" in line and "estimators" in line


@pytest.mark.parametrize("estimator", ["sklearn.svm.LinearSVC", "LinearSVC", "sklearn.svm._classes.LinearSVC"])
def test_sklearn_classifiers_by_name_or_path_validate(project, estimator):
    from sklearn.svm import LinearSVC

    project.params(heads={"svm": {"type": "sklearn", "estimator": estimator, "grid": {"C": [1, 10]}}})
    assert load_params().heads["svm"].estimator_class() is LinearSVC


def test_an_untrusted_module_is_never_imported(project, capfd):
    sys.modules.pop("this", None)
    line = estimator_error(project, "this.x")  # `import this` prints the Zen of Python
    assert "module 'this' is not scikit-learn and not in this head's trusted_modules" in line
    assert "this" not in sys.modules and "Beautiful is better" not in capfd.readouterr().out


@pytest.mark.parametrize("estimator", ["subprocess.Popen", "multiprocessing.pool.Pool", "os.system"])
def test_a_class_outside_sklearn_needs_trusted_modules(project, estimator):
    line = estimator_error(project, estimator)
    assert "trusted_modules, so it is not imported" in line


@pytest.mark.parametrize("estimator, trusted", [("subprocess.Popen", "subprocess"),
                                                ("multiprocessing.pool.Pool", "multiprocessing"),
                                                ("os.system", "os")])
def test_a_trusted_class_is_checked_before_it_is_constructed(project, estimator, trusted):
    line = estimator_error(project, estimator, trusted_modules=[trusted])
    assert f"'{estimator}' is not a classifier class (a subclass of sklearn.base.ClassifierMixin)" in line
    assert multiprocessing.active_children() == []  # a Pool() would have started worker processes


def test_a_classifier_from_a_trusted_module_validates_and_only_then_is_imported(project, monkeypatch, capfd):
    (project.root / "my_models.py").write_text(
        "print('my_models imported')\n"
        "from sklearn.base import BaseEstimator, ClassifierMixin\n"
        "class Nearest(ClassifierMixin, BaseEstimator):\n"
        "    def __init__(self, k=1):\n"
        "        self.k = k\n")
    monkeypatch.syspath_prepend(str(project.root))
    monkeypatch.delitem(sys.modules, "my_models", raising=False)
    estimator_error(project, "my_models.Nearest")
    assert "my_models" not in sys.modules and "my_models imported" not in capfd.readouterr().out

    project.params(heads={"knn": {"estimator": "my_models.Nearest", "trusted_modules": ["my_models"]}})
    assert load_params().heads["knn"].new_estimator().get_params() == {"k": 1}


def test_trusted_modules_must_be_module_names(project):
    message = invalid(project, heads={"knn": {"trusted_modules": ["my models"]}})
    assert "heads.knn.trusted_modules: ['my models'] are not module names" in message


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/abs", "a/b", ".", "..", "with space", "", "tab\tname",
                                  "finetune", "Finetune", "best", "all", "v1.2", "...x"])
def test_bad_head_names_fail_naming_the_head(project, name):
    message = invalid(project, heads={name: {"type": "logistic"}})
    assert f"heads.{name}: " in message
    assert "letters, digits" in message or "is reserved" in message


@pytest.mark.parametrize("name", ["v1-2", "my-head_2", "LOGREG2", "_x"])
def test_head_names_of_letters_digits_dash_underscore_validate(project, name):
    project.params(heads={name: {"type": "logistic"}})
    assert name in load_params().heads


def test_reserved_names_are_the_models_that_are_not_heads():
    assert {finetune_files.MODEL_NAME, BEST_KEY, "all"} <= set(config.RESERVED_MODEL_NAMES)


def test_head_names_differing_only_in_case_are_refused(project):
    message = invalid(project, heads={"LogReg": {"type": "logistic"}})  # next to the default `logreg`
    assert "heads.LogReg: the name differs from 'logreg' only in letter case" in message


def test_no_head_is_a_params_error(project):
    project.params(finetune={"init_head": None})
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["heads"] = {}
    Path("params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(UserError, match=r"heads: at least one head is needed"):
        load_params()


@pytest.mark.parametrize("store", ["", "  ", ".", "./", "{cwd}", "..", "{cwd}/..", "data", "data/", "./data",
                                   "{cwd}/data", "models", "metrics", "plots", "reports", "stages",
                                   "transfer_learning", "tests", "benchmarks", ".dvc", ".git", "data/prepared",
                                   "data/features", "data/prepared/store", "data/features/x/y", ".dvc/cache",
                                   ".git/store", "data/../models"])
def test_the_store_needs_a_folder_of_its_own(project, store):
    message = invalid(project, extract={"store": store.format(cwd=project.root)})
    assert "extract.store: the feature store needs a folder of its own" in message
    assert "valid: a new folder such as data/feature-store, or an absolute path outside the project" in message


def test_a_store_through_a_symlink_to_a_project_folder_is_refused(project):
    (project.root / "data").mkdir()
    (project.root / "link").symlink_to(project.root / "data")
    message = invalid(project, extract={"store": "link"})
    assert "extract.store: the feature store needs a folder of its own: 'link' is or holds the project's folder data" \
        in message


@pytest.mark.parametrize("store, output, owner", [
    ("models/backbone/fs", "models/backbone", "stage download in dvc.yaml"),
    ("models/backbone.onnx/fs", "models/backbone.onnx", "stage export in dvc.yaml"),
    ("models/heads/logreg/store", "models/heads/*", "stage train_heads in dvc.yaml"),
    ("models/heads/a-head-params.yaml-does-not-name/x", "models/heads/*", "stage train_heads in dvc.yaml"),
    ("plots/heads/mlp/store", "plots/heads/*", "stage train_heads in dvc.yaml"),
    ("models/finetune/store", "models/finetune", "stage finetune in dvc.yaml"),
])
def test_a_store_inside_a_dvc_yaml_output_is_refused_naming_the_output(project, store, output, owner):
    (project.root / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    message = invalid(project, extract={"store": store})
    assert (f"extract.store: the feature store needs a folder of its own: {store!r} is inside {output}, an output "
            f"of {owner}") in message


@pytest.mark.parametrize("git", [True, False], ids=["checkout", "no-git"])
def test_a_store_inside_a_dvc_tracked_folder_is_refused_naming_its_dvc_file(project, git):
    if git:
        subprocess.run(["git", "init", "-q"], cwd=project.root, check=True)
    (project.root / "raw").mkdir()
    (project.root / "raw" / "images.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: images\n")
    message = invalid(project, extract={"store": "raw/images/store"})
    assert "'raw/images/store' is inside raw/images, an output of raw/images.dvc" in message
    project.params(extract={"store": "raw/store"})
    assert load_params().extract.store == "raw/store"


def test_the_repo_s_own_outputs_leave_the_default_store_valid():
    outputs = dvc_outputs(REPO)
    assert {"data/prepared", "data/features", "models/backbone", "models/heads/*"} <= {o.path for o in outputs}
    assert load_params(REPO / "params.yaml").extract.store == "data/feature-store"


@pytest.mark.parametrize("store", ["data/feature-store", "store", "models/feature-store", "{elsewhere}",
                                   "{cwd}/data/feature-store"])
def test_a_store_folder_of_its_own_is_valid(project, tmp_path_factory, store):
    store = store.format(cwd=project.root, elsewhere=tmp_path_factory.mktemp("shared") / "store")
    project.params(extract={"store": store})
    assert load_params().extract.store == store


def _params_text_with(project, text: str) -> None:
    """params.yaml as a user writes it: the fixture's sections, then `text`'s, which PyYAML alone would misread."""
    params = yaml.safe_load(Path("params.yaml").read_text())
    for section in yaml.load(text, Loader=config.ParamsLoader):
        params.pop(section, None)
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False) + text)


def test_exponent_floats_as_yaml_users_write_them_are_numbers(project):
    _params_text_with(project, """\
data:
  source: digits
  val_fraction: 1.5e-1
heads:
  logreg: {type: logistic, C: [1e-3, 1]}
  lin:
    type: linear
    lr: 1e-3
    weight_decay: 1E-4
  svc:
    type: sklearn
    estimator: LogisticRegression
    params: {tol: 1e-5}
    grid: {C: [1e-3, 1]}
finetune:
  lr_head: 5e-4
  lr_backbone: 1.0e-5
""")
    assert yaml.safe_load(Path("params.yaml").read_text())["heads"]["lin"]["lr"] == "1e-3"  # what PyYAML reads
    params = load_params()
    assert params.data.val_fraction == 0.15
    assert params.heads["logreg"].C == [0.001, 1] and type(params.heads["logreg"].C[0]) is float
    assert params.heads["lin"].lr == 0.001 and params.heads["lin"].weight_decay == 0.0001
    assert params.heads["svc"].params == {"tol": 1e-5} and params.heads["svc"].grid == {"C": [0.001, 1]}
    assert params.finetune.lr_head == 0.0005 and params.finetune.lr_backbone == 1e-5


def _unwrapped(annotation) -> list:
    """The types and Literal values an annotation allows, through Annotated, Optional, Union and list."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return list(args)
    if origin is typing.Annotated:
        return _unwrapped(args[0])
    if args:
        return [t for arg in args for t in _unwrapped(arg)]
    return [annotation]


def number_fields(model: type[BaseModel], number: type, where: tuple = ()):
    """(dotted key, is a list) of every field of `model` and its sections that takes a `number`."""
    for name, field in model.model_fields.items():
        allowed = _unwrapped(field.annotation)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from number_fields(field.annotation, number, (*where, name))
        elif any(t is number or type(t) is number for t in allowed):
            yield (*where, name), _is_list(field.annotation)


def _is_list(annotation) -> bool:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return typing.get_origin(annotation) is list


def params_with(key: tuple, value) -> dict:
    if key[0] == "heads":
        head = {"type": key[1]} | ({"estimator": "KNeighborsClassifier"} if key[1] == "sklearn" else {})
        return {"heads": {"h": {**head, key[2]: value}}}
    tree: dict = {key[-1]: value}
    for part in reversed(key[:-1]):
        tree = {part: tree}
    return tree


def as_written(key: tuple, is_list: bool) -> str:
    """The dotted key params_with wrote the value at."""
    return ".".join(("heads", "h", *key[2:]) if key[0] == "heads" else key) + (".0" if is_list else "")


def _key_id(value) -> str:
    return ".".join(value) if isinstance(value, tuple) else "list" if value else "scalar"


def every_number_field(number: type) -> list[tuple[tuple, bool]]:
    sections = [f for f in number_fields(config.Params, number) if f[0][0] != "heads"]
    heads = [(("heads", kind, *key), is_list) for kind, model in config.HEAD_TYPES.items()
             for key, is_list in number_fields(model, number)]
    return sections + heads


@pytest.mark.parametrize("key, is_list", every_number_field(int), ids=_key_id)
def test_a_bool_is_not_an_int_anywhere(project, key, is_list):
    message = invalid(project, **params_with(key, [True] if is_list else True))
    assert f"{as_written(key, is_list)}: " in message and "(got True)" in message


def test_every_int_field_is_covered():
    keys = {".".join(key) for key, _ in every_number_field(int)}
    assert {"data.per_class", "data.seed", "data.bit_depth", "backbone.cut", "extract.batch_size",
            "finetune.unfreeze", "finetune.epochs", "heads.mlp.hidden", "heads.logistic.max_iter",
            "heads.sklearn.seed", "advise.sample", "export.opset"} <= keys


@pytest.mark.parametrize("key, is_list", every_number_field(float), ids=_key_id)
def test_a_bool_is_not_a_float_anywhere(project, key, is_list):
    message = invalid(project, **params_with(key, [True] if is_list else True))
    assert f"{as_written(key, is_list)}: Input should be a valid number (got True)" in message


@pytest.mark.parametrize("value", ["64", 64.0])
def test_an_int_given_as_text_or_float_is_refused(project, value):
    message = invalid(project, extract={"batch_size": value})
    assert "extract.batch_size: Input should be a valid integer" in message


def _value_at(params, key: tuple, is_list: bool):
    node = params.heads["h"] if key[0] == "heads" else params
    for part in key[2:] if key[0] == "heads" else key:
        node = getattr(node, part)
    return node[0] if is_list else node


@pytest.mark.parametrize("key, is_list", every_number_field(float), ids=_key_id)
def test_every_float_field_takes_decimal_text(project, key, is_list):
    project.params(**params_with(key, ["1e-3"] if is_list else "1e-3"))  # safe_dump quotes it: the string
    value = _value_at(load_params(), key, is_list)
    assert value == 0.001 and type(value) is float


@pytest.mark.parametrize("text", ["nan", "inf", "1e-3x", "one", ""])
def test_float_text_that_is_not_a_decimal_number_is_refused(project, text):
    message = invalid(project, heads={"logreg": {"type": "logistic", "C": [text]}})
    assert f"heads.logreg.C.0: Input should be a valid number (got {text!r})" in message


@pytest.mark.parametrize("text", ["batch_size: 1e3", "batch_size: '1e3'", "batch_size: 6.4e1", "batch_size: true"])
def test_an_int_field_refuses_exponent_numbers_and_bools(project, text):
    _params_text_with(project, f"extract:\n  {text}\n")
    with pytest.raises(UserError, match="extract.batch_size: Input should be a valid integer"):
        load_params()


def test_unknown_ort_provider_lists_valid_ones(project):
    message = invalid(project, extract={"providers": ["CPUExecutionProvider", "FooExecutionProvider"]})
    assert "extract.providers" in message and "FooExecutionProvider" in message
    assert "CPUExecutionProvider" in message.split("; valid:")[1]


def test_finetune_init_head_must_be_a_head(project):
    message = invalid(project, finetune={"init_head": "missing"})
    assert "finetune.init_head" in message and "'missing'" in message
    for head in ("logreg", "linear", "mlp", "knn"):
        assert head in message


def test_finetune_init_head_null_is_allowed(project):
    project.params(finetune={"init_head": None})
    assert load_params().finetune.init_head is None


def test_missing_params_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="params.yaml"):
        load_params(tmp_path / "params.yaml")


def test_invalid_yaml_is_a_user_error(project):
    (project.root / "params.yaml").write_text("data: {source: [unclosed\n")
    with pytest.raises(UserError, match="params.yaml is not valid YAML") as caught:
        load_params()
    # the line it stopped at, with a caret under the place (PyYAML's own parser; libyaml's message has neither)
    assert "line 1, column 16:\n    data: {source: [unclosed\n                   ^" in str(caught.value)


def test_both_yaml_parsers_read_params_files_alike():
    """load_params parses with libyaml and reports errors with PyYAML's parser: the two must read the same data."""
    texts = [(REPO / "params.yaml").read_text(), "a: [1e-3, 1.5E+2, -2e5, '1e-3', 1_000, 0x10, yes, ~, .inf]\n"]
    for text in texts:
        assert yaml.load(text, Loader=config.LibyamlParamsLoader) == yaml.load(text, Loader=config.ParamsLoader)
    assert config.LibyamlParamsLoader.__mro__[1] is yaml.CSafeLoader  # libyaml is there (the PyYAML wheels ship it)


def test_extract_can_skip_importing_estimators_but_the_others_check_them(project):
    from transfer_learning.params import load_params

    project.params(heads={"knn": {"type": "sklearn", "estimator": "sklearn.neighbors.Nope"}})
    with pytest.raises(UserError, match="heads.knn.estimator"):
        load_params()
    assert load_params(resolve_estimators=False).heads["knn"].estimator == "sklearn.neighbors.Nope"


STAGES = ("prepare", "download", "export", "extract", "train_heads", "advise", "finetune", "evaluate", "layers")


@pytest.mark.parametrize("bad, message", [
    ({"backbone": {"cutt": 14}}, "backbone.cutt: unknown key"),
    ({"heads": {"knn": {"estimator": "sklearn.neighbors.Nope"}}}, "'sklearn.neighbors.Nope' is not a scikit-learn"),
])
def test_every_stage_checks_the_whole_params_file_before_its_work(project, bad, message):
    """dvc.yaml has no validate stage: whichever stage DVC runs first must stop on a problem anywhere in the file,
    in a section it does not read too, and the estimator and arch names are resolved, not only the keys."""
    import importlib

    project.params(**bad)
    for name in STAGES:
        with pytest.raises(UserError, match=re.escape(message)):
            importlib.import_module(f"stages.{name}").main()
    assert not (project.root / "data/prepared/manifest.csv").exists()


def test_the_catalog_lists_what_the_libraries_offer():
    """load_params checks arch, weights, estimators and providers against common/catalog.py's cached listings: they
    are what torchvision, scikit-learn and ONNX Runtime give when imported."""
    import onnxruntime
    import torchvision
    from sklearn.utils.discovery import all_estimators
    from torchvision.models import get_model_weights

    from transfer_learning.common import catalog

    models = catalog.torchvision_models()
    assert models["archs"] == torchvision.models.list_models(module=torchvision.models)
    assert models["weights"]["resnet18"] == [w.name for w in get_model_weights("resnet18")]
    classifiers = catalog.sklearn_classifiers()
    assert list(classifiers) == [name for name, _ in all_estimators(type_filter="classifier")]
    knn = classifiers["KNeighborsClassifier"]
    assert {"sklearn.neighbors", "sklearn.neighbors._classification"} <= set(knn["modules"])
    assert knn["public"] == "sklearn.neighbors.KNeighborsClassifier" and knn["fails"] is None
    assert "estimators" in classifiers["StackingClassifier"]["fails"]
    assert catalog.onnxruntime_providers() == onnxruntime.get_all_providers()
    with warnings.catch_warnings():  # listed again, as on a machine's first check: a deprecated class warns no user
        warnings.simplefilter("error")
        assert catalog._sklearn_listing() == classifiers


def test_a_damaged_catalog_file_is_listed_again(tmp_path, monkeypatch, caplog):
    from transfer_learning.common import catalog

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    providers = catalog.onnxruntime_providers()
    (path,) = (tmp_path / "transfer_learning").glob("onnxruntime-*.json")
    saved = path.read_text()
    path.write_text(saved.replace('"CPUExecutionProvider"', '"CPUExecutionProviderX"'))  # a changed listing
    assert catalog.onnxruntime_providers() == providers
    assert "does not match its recorded sha256" in caplog.text and path.read_text() == saved
    path.write_bytes(path.read_bytes()[:40])  # truncated
    assert catalog.onnxruntime_providers() == providers
    assert "is damaged" in caplog.text and path.read_text() == saved


def test_the_full_check_imports_neither_torch_nor_sklearn_nor_onnxruntime(project):
    """Every stage makes it first, a disabled finetune after every head edit too: the listings come from the cache
    (warmed here by load_params)."""
    load_params()
    probe = ("import sys; from transfer_learning.params import load_params; load_params(); "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'sklearn', 'onnxruntime'}))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=project.root, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
