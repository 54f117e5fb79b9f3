"""make setup's check of the cached MobileNetV2 weights: torchvision's file in torch.hub's folder, verified by its
hash, without importing torch."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.models import MobileNet_V2_Weights

from tests.conftest import REPO
from transfer_learning.backbone import offline_weights, weights

MOBILENET = MobileNet_V2_Weights.IMAGENET1K_V1


def test_the_file_and_its_hash_are_torchvisions():
    assert offline_weights.URL == MOBILENET.url
    assert offline_weights.HASH_PREFIX == weights.expected_prefix(MOBILENET)


@pytest.mark.parametrize("env", [{}, {"TORCH_HOME": "th"}, {"XDG_CACHE_HOME": "xdg"},
                                 {"TORCH_HOME": "~/th", "XDG_CACHE_HOME": "xdg"}])
def test_the_cache_file_is_where_torch_hub_looks(env, tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value if value.startswith("~") else str(tmp_path / value))
    assert offline_weights.cache_file() == weights.cache_path(MOBILENET)
    assert torch.hub.get_dir().startswith(str(tmp_path))


def run_setup(torch_home: Path) -> subprocess.CompletedProcess:
    """make setup's command, in a fresh process; prints whether it imported torch."""
    code = ("import runpy, sys; runpy.run_module('transfer_learning.backbone.offline_weights', run_name='__main__'); "
            "print(sorted({'torch', 'torchvision'} & set(sys.modules)))")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                          env={"PATH": "/usr/bin:/bin", "TORCH_HOME": str(torch_home), "HOME": str(torch_home)})


def cached_weights() -> Path:
    """The weights `make setup` put in torch.hub's cache."""
    real = weights.cache_path(MOBILENET)
    if not real.is_file():
        pytest.fail(f"{real} missing: run `make setup`")
    return real


def test_a_verified_cached_file_is_reused_without_importing_torch(tmp_path):
    real = cached_weights()
    cached = tmp_path / "hub" / "checkpoints" / real.name
    cached.parent.mkdir(parents=True)
    cached.symlink_to(real)
    done = run_setup(tmp_path)
    assert f"reused {cached} (hash verified)" in done.stderr
    assert done.stdout.strip() == "[]"


def test_a_cached_file_with_one_byte_changed_fails_the_hash_check(tmp_path):
    real = cached_weights()
    tampered = tmp_path / real.name
    tampered.write_bytes(real.read_bytes()[:-1] + b"\0")
    assert not offline_weights.has_published_hash(tampered)
    assert offline_weights.has_published_hash(real)
