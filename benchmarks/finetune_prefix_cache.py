"""Fine-tuning with the frozen prefix cached (finetune.cache_prefix: true) vs the full forward path, over a whole run:
    full   = one-time cost (val's prefix outputs, which both modes cache)          + epochs x full epoch
    cached = one-time cost (train's and val's prefix outputs, into a fresh store)  + epochs x cached epoch
with `epochs` = finetune.epochs of params.yaml (the real number of epochs). Same images (un-augmented on both
sides, since the cached prefix sees un-augmented images), same net, same seed, CPU on both sides, one run.
Each one-time cost: --reps repetitions into a fresh store after 1 warm-up; each epoch time: the median of --reps
epochs after 1 warm-up epoch.

Run from the project root after `dvc repro` (it reads data/prepared, models/backbone and models/heads):
    python benchmarks/finetune_prefix_cache.py [--images 256] [--unfreeze 2] [--reps 5]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import Timing, ratio_line  # noqa: E402
from transfer_learning.backbone import files as backbone_files  # noqa: E402
from transfer_learning.finetune.data import LabelledImages, split_images  # noqa: E402
from transfer_learning.finetune.loop import fit  # noqa: E402
from transfer_learning.finetune.model import FineTuneNet  # noqa: E402
from transfer_learning.finetune.run import inputs_for  # noqa: E402
from transfer_learning.heads import files as head_files  # noqa: E402
from transfer_learning.params import FinetuneParams  # noqa: E402

NO_AUGMENT = {"random_resized_crop": False, "hflip": False, "color_jitter": 0.0}
CPU = torch.device("cpu")
VAL_IMAGES = 64
BATCH = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="train images per epoch")
    parser.add_argument("--unfreeze", type=int, default=2)
    parser.add_argument("--init-head", default="logreg")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    if args.reps < 5:
        raise SystemExit(f"--reps {args.reps}: at least 5")
    logging.basicConfig(level=logging.WARNING)
    epochs = int(yaml.safe_load(Path("params.yaml").read_text())["finetune"]["epochs"])

    backbone = backbone_files.load()
    head = head_files.load(args.init_head)
    full_train, full_val = split_images("train"), split_images("val")
    train = LabelledImages(full_train.requests[:args.images], full_train.labels[:args.images])
    val = LabelledImages(full_val.requests[:VAL_IMAGES], full_val.labels[:VAL_IMAGES])
    node = backbone.anatomy.cut_node("penultimate")
    params = FinetuneParams(epochs=1 + args.reps, patience=2 + args.reps, batch_size=BATCH, augment=NO_AUGMENT)

    def new_net() -> FineTuneNet:
        return FineTuneNet(backbone.model(), backbone.anatomy, node, "avg", args.unfreeze, "frozen", head,
                           len(head.classes), backbone.preprocessing.crop)

    once: dict[bool, Timing] = {}
    epoch: dict[bool, Timing] = {}
    with tempfile.TemporaryDirectory() as tmp:
        seconds: dict[bool, list[float]] = {False: [], True: []}
        prepared = {}
        for rep in range(1 + args.reps):  # each into a fresh store, so the prefix is really computed; sides in turn
            for cached in (False, True):
                net, store = new_net(), Path(tmp) / f"store-{cached}-{rep}"
                started = time.perf_counter()
                train_inputs = inputs_for(net, train, None, cached, store, "benchmark", backbone.preprocessing, BATCH)
                val_inputs = inputs_for(net, val, None, True, store, "benchmark", backbone.preprocessing, BATCH)
                seconds[cached].append(time.perf_counter() - started)
                prepared[cached] = (net, train_inputs, val_inputs)
        for cached in (False, True):
            once[cached] = Timing(tuple(seconds[cached][1:]))
            net, train_inputs, val_inputs = prepared[cached]
            outcome = fit(net, train_inputs, val_inputs, params, 0, Path(tmp) / f"ckpt-{cached}.pt", CPU)
            per_epoch = [record["seconds"] for record in outcome.history if record["epoch"] >= 1]
            if len(per_epoch) != 1 + args.reps:
                raise SystemExit(f"fit stopped after {len(per_epoch)} epochs; expected {1 + args.reps}")
            epoch[cached] = Timing(tuple(per_epoch[1:]))

    full_run = once[False].median + epochs * epoch[False].median
    cached_run = once[True].median + epochs * epoch[True].median
    print(f"MobileNetV2 @ {backbone.preprocessing.crop}, unfreeze={args.unfreeze}, CPU ({torch.get_num_threads()} "
          f"torch threads), {len(train)} train + {len(val)} val images, batch {BATCH}, {args.reps} repetitions")
    print(f"  one-time, full path (val prefix)      : {once[False]}")
    print(f"  one-time, cached (train + val prefix) : {once[True]}")
    print(f"  epoch, full forward path : {epoch[False]}  ({len(train) / epoch[False].median:6.1f} img/s)")
    print(f"  epoch, cached prefix     : {epoch[True]}  ({len(train) / epoch[True].median:6.1f} img/s)")
    print(ratio_line("  epoch speed-up alone (prefix cost excluded)", epoch[False].median / epoch[True].median,
                     epoch[True], epoch[False]))
    print(f"  a whole run of finetune.epochs = {epochs}: full {full_run:.1f} s vs cached {cached_run:.1f} s "
          f"(prefix included) -> speed-up {full_run / cached_run:.2f}x")
    extra, saved = once[True].median - once[False].median, epoch[False].median - epoch[True].median
    if extra > 0 and saved > 0:
        print(f"  the cache pays for itself after {extra / saved:.1f} epochs")


if __name__ == "__main__":
    main()
