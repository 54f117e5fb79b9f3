"""A setting that cannot change a result (where extract runs, how wide, where the store is, how a fine-tune is spread
over processes) re-runs no stage but the params check: the stages do not declare it (a mistyped key still stops
`dvc repro` before any work: tests/test_pipeline_dvc.py). On a copy of the committed pipeline that
tests/test_pipeline_dvc.py builds once."""
from __future__ import annotations

import contextlib
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from tests.conftest import merged
from tests.dvc_repo import DvcRepo
from tests.test_pipeline_dvc import baseline  # noqa: F401  (the fixture: the pipeline run once, committed)
from transfer_learning.params import Params

ROOT = Path(__file__).resolve().parent.parent

# each machine setting, and a valid value other than the default (all of them valid together)
MACHINE_SETTINGS = {
    "backbone.weights_path": None,  # set in the test: a file that exists (a copy of the weights, verified by hash)
    "extract.providers": ["CPUExecutionProvider"],
    "extract.batch_size": 7,
    "extract.workers": 0,
    "extract.store": "elsewhere/feature-store",
    "extract.engine": "ray",
    "extract.ray.address": "auto",
    "extract.ray.actors": 3,
    "extract.ray.batch_size": 16,
    "extract.ray.num_cpus_per_actor": 1.0,
    "extract.ray.num_gpus_per_actor": 0,
    "extract.ray.decode": "tasks",
    "finetune.nproc": 2,
    "finetune.nnodes": 2,
    "finetune.rdzv_endpoint": "node0.example.org:29400",
}


def nested(dotted: str, value) -> dict:
    for key in reversed(dotted.split(".")):
        value = {key: value}
    return value


def leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """The dotted keys of params.yaml's schema; `heads` as one key (its entries are the user's)."""
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        annotation = field.annotation
        if typing.get_origin(annotation) is None and isinstance(annotation, type) and \
                issubclass(annotation, BaseModel) and dotted != "heads":
            keys += leaf_keys(annotation, dotted + ".")
        else:
            keys.append(dotted)
    return keys


def declared_params() -> set[str]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = set()
    for stage in stages.values():
        for entry in stage.get("do", stage).get("params", []):
            for key in ([entry] if isinstance(entry, str) else [k for value in entry.values() for k in value]):
                declared.add(key.replace(".${key}", ""))  # train_heads@<name> declares heads.<name>
    return declared


def test_every_key_is_declared_by_a_stage_or_is_a_machine_setting():
    declared = declared_params()

    def covered(key: str) -> bool:
        parts = key.split(".")
        return any(".".join(parts[:i]) in declared for i in range(1, len(parts) + 1))

    keys = leaf_keys(Params)
    assert set(MACHINE_SETTINGS) <= set(keys)
    neither = [key for key in keys if not covered(key) and key not in MACHINE_SETTINGS]
    both = [key for key in keys if covered(key) and key in MACHINE_SETTINGS]
    assert not neither, f"no stage declares {neither}: declare them in dvc.yaml, or list them here if they " \
                        "cannot change a result"
    assert not both, f"dvc.yaml declares machine settings {both}: changing one would re-run a stage for nothing"


def stale_stages(root: Path) -> set[str]:
    """What `dvc repro` would run, as `dvc status` computes it (DVC's Python API: one process for every check)."""
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo() as repo:
        return set(repo.status())


@pytest.mark.slow
def test_a_machine_setting_reruns_only_the_params_check(baseline, tmp_path):
    import torch

    repo = DvcRepo.copy_of(baseline, tmp_path / "repo")
    params_file = repo.root / "params.yaml"
    committed = yaml.safe_load(params_file.read_text())
    weights = sorted(Path(torch.hub.get_dir(), "checkpoints").glob("mobilenet_v2-*.pth"))
    assert weights, "make setup puts the offline weights in torch's hub cache"
    settings = {**MACHINE_SETTINGS, "backbone.weights_path": str(weights[0])}
    every = committed
    for dotted, value in settings.items():
        every = merged(every, nested(dotted, value))
    params_file.write_text(yaml.safe_dump(every, sort_keys=False))
    # every setting changed at once: a stage declaring any of them is stale. One setting at a time only to name it
    stale = stale_stages(repo.root)
    if stale != {"check_params"}:
        for dotted, value in settings.items():
            params_file.write_text(yaml.safe_dump(merged(committed, nested(dotted, value)), sort_keys=False))
            assert stale_stages(repo.root) == {"check_params"}, dotted
    assert stale == {"check_params"}
    out = repo.dvc("repro")
    assert "Running stage 'check_params'" in out
    assert "Running stage" not in out.replace("Running stage 'check_params'", ""), out
    assert stale_stages(repo.root) == set()
