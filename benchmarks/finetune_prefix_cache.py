"""Fine-tune epoch time with unfreeze=2: the full forward path (every batch through the frozen prefix) vs the cached
frozen prefix (only the unfrozen tail runs). Same images, same net, same seed, measured in one run.

Run from the project root after `dvc repro` (it reads data/prepared, models/backbone and models/heads):
    python benchmarks/finetune_prefix_cache.py [--images 512] [--unfreeze 2]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transfer_learning.backbone import files as backbone_files
from transfer_learning.finetune.data import LabelledImages, split_images
from transfer_learning.finetune.loop import fit
from transfer_learning.finetune.model import FineTuneNet
from transfer_learning.finetune.run import inputs_for
from transfer_learning.heads import files as head_files
from transfer_learning.params import FinetuneParams

NO_AUGMENT = {"random_resized_crop": False, "hflip": False, "color_jitter": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="train images per epoch")
    parser.add_argument("--unfreeze", type=int, default=2)
    parser.add_argument("--init-head", default="logreg")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    backbone = backbone_files.load()
    head = head_files.load(args.init_head)
    full_train, full_val = split_images("train"), split_images("val")
    train = LabelledImages(full_train.requests[:args.images], full_train.labels[:args.images])
    val = LabelledImages(full_val.requests[:64], full_val.labels[:64])
    params = FinetuneParams(epochs=1, batch_size=32, augment=NO_AUGMENT)
    node = backbone.anatomy.cut_node("penultimate")
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)  # a fresh store: the one-time prefix cost is measured too
        for cached in (False, True):
            net = FineTuneNet(backbone.model(), backbone.anatomy, node, "avg", args.unfreeze, "frozen", head,
                              len(head.classes), backbone.preprocessing.crop)
            started = time.perf_counter()
            train_inputs = inputs_for(net, train, None, cached, store, "benchmark", backbone.preprocessing, 32)
            val_inputs = inputs_for(net, val, None, True, store, "benchmark", backbone.preprocessing, 32)
            prepare = time.perf_counter() - started
            outcome = fit(net, train_inputs, val_inputs, params, 0, store / f"ckpt-{cached}.pt", torch.device("cpu"))
            seconds[cached] = (outcome.history[1]["seconds"], prepare)
    (full, _), (fast, once) = seconds[False], seconds[True]
    print(f"MobileNetV2 @ {backbone.preprocessing.crop}, unfreeze={args.unfreeze}, {len(train)} train images, "
          f"{torch.get_num_threads()} torch threads")
    print(f"  full forward path : {full:7.2f} s/epoch ({len(train) / full:6.1f} img/s)")
    print(f"  cached prefix     : {fast:7.2f} s/epoch ({len(train) / fast:6.1f} img/s)")
    print(f"  one-time prefix computation (train + val): {once:.1f} s, kept in the feature store")
    print(f"  epoch speed-up: {full / fast:.1f}x")


if __name__ == "__main__":
    main()
