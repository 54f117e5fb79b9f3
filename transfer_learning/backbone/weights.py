"""Pretrained weights through torchvision's own weights API, verified before they are loaded.

torchvision checks a checkpoint's hash only when it downloads it; a file already in the torch hub cache (or
given as backbone.weights_path) is trusted blindly. Here every file is checked against the hash prefix that
torchvision publishes in the file name, and loaded with weights_only=True.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import WeightsEnum, get_model, get_model_weights

from transfer_learning.common.errors import UserError
from transfer_learning.common.hashing import sha256_file

log = logging.getLogger(__name__)
HASH_PREFIX = re.compile(r"-([a-f0-9]+)\.")  # the same rule as torch.hub's check_hash


@dataclass(frozen=True)
class VerifiedWeights:
    weights: WeightsEnum
    path: Path
    sha256: str


def resolve(arch: str, name: str) -> WeightsEnum:
    """The weights enum member for `name` (or DEFAULT), as torchvision's builders resolve it."""
    enum = get_model_weights(arch)
    try:
        return enum.verify(name)
    except (KeyError, ValueError):
        raise UserError(
            f"backbone.weights: {name!r} does not exist for {arch}; valid: {', '.join(w.name for w in enum)}"
        ) from None


def cache_path(weights: WeightsEnum) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def expected_prefix(weights: WeightsEnum) -> str:
    match = HASH_PREFIX.search(os.path.basename(weights.url))
    if not match:
        raise UserError(f"{weights} has no hash in its file name {weights.url}; cannot verify it")
    return match.group(1)


def verify(weights: WeightsEnum, path: Path) -> str:
    """sha256 of `path`; raises unless it starts with torchvision's published prefix for `weights`."""
    digest = sha256_file(path)
    prefix = expected_prefix(weights)
    if not digest.startswith(prefix):
        raise UserError(
            f"{path} is not {weights}: its sha256 {digest[:16]}… does not start with {prefix} "
            f"(from {weights.url}). Delete the file (or fix backbone.weights_path) and run again."
        )
    return digest


def fetch(weights: WeightsEnum, weights_path: str | None = None) -> VerifiedWeights:
    """A verified local copy: backbone.weights_path, else the hub cache, else torchvision's download."""
    if weights_path:
        path = Path(weights_path)
        source = "backbone.weights_path"
    else:
        path = cache_path(weights)
        source = "torch hub cache"
        if not path.is_file():
            log.info("downloading %s from %s", weights, weights.url)
            try:
                torch.hub.download_url_to_file(weights.url, str(path) + ".part", progress=True)
            except Exception as error:  # no network, proxy, DNS...: tell the user the offline ways in
                raise UserError(
                    f"cannot download {weights} ({weights.url}): {error}. Offline, put the file at {path} "
                    "or set backbone.weights_path (MobileNetV2 IMAGENET1K_V1: `make setup` seeds it)."
                ) from None
            shutil.move(str(path) + ".part", path)
            source = "download"
    digest = verify(weights, path)
    log.info("verified %s (%s, sha256 %s…)", path, source, digest[:12])
    return VerifiedWeights(weights, path, digest)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"{path} is not a plain tensor state dict (weights_only load failed: {error})") from None


def build_model(arch: str, verified: VerifiedWeights | None) -> nn.Module:
    """The torchvision model for `arch`: random init when `verified` is None, else the verified weights."""
    if verified is None:
        return get_model(arch, weights=None).eval()
    model = get_model(arch, weights=None, num_classes=len(verified.weights.meta["categories"]))
    try:
        model.load_state_dict(load_state_dict(verified.path))
    except RuntimeError as error:
        raise UserError(f"{verified.path} does not fit {arch}: {error}") from None
    return model.eval()
