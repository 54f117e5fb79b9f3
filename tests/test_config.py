"""params.yaml validation: every problem fails before any work, naming the dotted key and the valid choices."""
from __future__ import annotations

from pathlib import Path

import pytest

from stages.core.config import load_params
from stages.core.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def invalid(project, **sections) -> str:
    """Write params.yaml with these overrides, load it, and return the UserError's message."""
    project.params(**sections)
    with pytest.raises(UserError) as caught:
        load_params()
    message = str(caught.value)
    assert "params.yaml" in message
    return message


def test_repo_params_yaml_validates():
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "fashion-mnist"
    assert params.backbone.arch == "mobilenet_v2" and params.backbone.weights == "IMAGENET1K_V1"
    assert set(params.heads) == {"logreg", "linear", "mlp", "knn"}
    assert params.finetune.init_head in params.heads


def test_fixture_params_validate(project):
    assert load_params().data.per_class == 300


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


def test_estimator_not_importable_names_the_key(project):
    message = invalid(project, heads={"knn": {"estimator": "sklearn.nothing.Foo"}})
    assert "sklearn.nothing.Foo" in message and "not importable" in message
    assert "heads.knn.estimator" in message


def test_estimator_not_a_classifier_names_the_key(project):
    message = invalid(project, heads={"knn": {"estimator": "sklearn.preprocessing.StandardScaler"}})
    assert "StandardScaler" in message and "not a scikit-learn classifier" in message
    assert "heads.knn.estimator" in message


def test_another_sklearn_classifier_validates(project):
    project.params(heads={"svm": {"type": "sklearn", "estimator": "sklearn.svm.LinearSVC", "grid": {"C": [1, 10]}}})
    assert load_params().heads["svm"].estimator == "sklearn.svm.LinearSVC"


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
    with pytest.raises(UserError, match="params.yaml is not valid YAML"):
        load_params()


def test_extract_can_skip_importing_estimators_but_the_others_check_them(project):
    from stages.core.config import load_params

    project.params(heads={"knn": {"type": "sklearn", "estimator": "sklearn.neighbors.Nope"}})
    with pytest.raises(UserError, match="heads.knn.estimator"):
        load_params()
    assert load_params(resolve_estimators=False).heads["knn"].estimator == "sklearn.neighbors.Nope"
