"""download: backbone.arch + backbone.weights -> models/backbone/{weights.pt, meta.json}.

Weights come through torchvision's weights API (hub cache, download, or backbone.weights_path), are verified
against torchvision's published hash even when cached, and are loaded with weights_only=True.
`weights: none` builds the architecture with a seeded random init: the from-scratch baseline.
"""
import logging

import torch
from torchvision.models import get_model_weights

from transfer_learning.backbone import files as backbone_files
from transfer_learning.backbone import weights
from transfer_learning.backbone.anatomy import anatomy
from transfer_learning.common.errors import run_main
from transfer_learning.data.images import Preprocessing
from transfer_learning.params import load_params

log = logging.getLogger("download")
RANDOM_INIT_SEED = 0


def main() -> None:
    params = load_params().backbone
    if params.weights is None:
        torch.manual_seed(RANDOM_INIT_SEED)
        model = weights.build_model(params.arch, None)
        resolved, verified = get_model_weights(params.arch).DEFAULT, None
        log.info("%s with random init (weights: none); preprocessing of %s", params.arch, resolved)
    else:
        resolved = weights.resolve(params.arch, params.weights)
        verified = weights.fetch(resolved, params.weights_path)
        model = weights.build_model(params.arch, verified)
    parts = anatomy(model)
    meta = {
        "arch": params.arch,
        "weights": None if verified is None else resolved.name,
        "sha256": None if verified is None else verified.sha256,
        "url": None if verified is None else resolved.url,
        "categories": None if verified is None else resolved.meta["categories"],
        "num_classes": len(resolved.meta["categories"]),
        "preprocessing": Preprocessing.from_weights_transforms(resolved.transforms()).to_json(),
        **parts.to_json(),
    }
    backbone_files.save(model, meta)
    log.info("%s: %d blocks, classifier %r, penultimate node %r -> %s", params.arch, len(parts.blocks),
             parts.classifier, parts.penultimate_node, backbone_files.BACKBONE_DIR)


if __name__ == "__main__":
    run_main(main)
