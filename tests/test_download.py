"""download: real weights through torchvision's API, hash-verified even from the cache, really pretrained."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data as skdata
from torchvision.models import MobileNet_V2_Weights

from stages import download
from transfer_learning.backbone import files as backbone_files
from transfer_learning.backbone import weights
from transfer_learning.common.errors import UserError

MOBILENET = MobileNet_V2_Weights.IMAGENET1K_V1
CATS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat", "lynx"}
COFFEE = {"espresso", "cup", "coffee mug", "eggnog"}


@pytest.fixture
def cached_file() -> Path:
    path = weights.cache_path(MOBILENET)
    if not path.is_file():
        pytest.fail(f"{path} missing: run `make setup` (python -m transfer_learning.backbone.offline_weights)")
    return path


def top5(photo) -> set[str]:
    backbone = backbone_files.load()
    batch = backbone.preprocessing.transform()(Image.fromarray(photo)).unsqueeze(0)
    with torch.inference_mode():
        logits = backbone.model()(batch)[0]
    return {MOBILENET.meta["categories"][i] for i in logits.topk(5).indices}


def test_pretrained_weights_recognise_real_photos(project, cached_file):
    download.main()
    meta = json.loads(backbone_files.META.read_text())
    assert meta["weights"] == "IMAGENET1K_V1"
    assert meta["sha256"].startswith("b0353104")
    assert len(meta["categories"]) == 1000 and meta["preprocessing"]["crop"] == 224
    assert len(meta["blocks"]) == 19 and "features.10.add" in meta["node_names"]
    assert top5(skdata.chelsea()) & CATS
    assert top5(skdata.coffee()) & COFFEE


def test_random_init_recognises_nothing(project):
    project.params(backbone={"weights": "none"})
    download.main()
    meta = json.loads(backbone_files.META.read_text())
    assert meta["weights"] is None and meta["sha256"] is None
    assert not top5(skdata.chelsea()) & CATS
    assert not top5(skdata.coffee()) & COFFEE


def test_a_tampered_cached_file_is_refused(project, cached_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    tampered = weights.cache_path(MOBILENET)
    tampered.parent.mkdir(parents=True)
    data = bytearray(cached_file.read_bytes())
    data[-100] ^= 0xFF  # torchvision itself would load this file without a word
    tampered.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not start with b0353104"):
        download.main()
    assert not backbone_files.WEIGHTS.exists()


def test_weights_path_for_air_gapped_machines(project, cached_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    local = tmp_path / "my-copy.pth"
    shutil.copyfile(cached_file, local)
    project.params(backbone={"weights_path": str(local)})
    download.main()
    assert json.loads(backbone_files.META.read_text())["sha256"].startswith("b0353104")
    local.write_bytes(b"not weights")
    with pytest.raises(UserError, match="my-copy.pth is not"):
        download.main()


def test_unknown_weights_name_lists_the_valid_ones():
    with pytest.raises(UserError, match="IMAGENET1K_V1"):
        weights.resolve("mobilenet_v2", "IMAGENET9K")
