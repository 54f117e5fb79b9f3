"""The fine-tune's frozen prefix (finetune.cache_prefix: true, and the val split always), measured in one run:

1. its one-time cost: the prefix's outputs for --images train images into a fresh store, computed
   a. in ONNX Runtime from the exported prefix, as the stage does (finetune/prefix.py: extract's compute path), vs
   b. in torch eager, as the stage did before (the same DataLoader of decoded images, normalized in torch, the
      net's prefix under no_grad, the same store writes),
   c. extract's backbone (models/backbone.onnx, the whole cut and pooled) on the same images, the same path,
   the sides taken in turn, --reps repetitions after one warm-up each; the ratios are b's and c's times over a's.
   Then the prefix's export itself (what a run pays once per backbone, cut and unfreeze; kept in the store after)
   and the check of a kept export (what every later run pays), --reps repetitions each.
2. a whole run of finetune.epochs (params.yaml) over the cached prefix vs the full forward path:
       full   = one-time cost (val's prefix outputs, which both modes cache)          + epochs x full epoch
       cached = one-time cost (train's and val's prefix outputs, into a fresh store)  + epochs x cached epoch
   each epoch time the median of --reps epochs after 1 warm-up epoch. Same images (un-augmented on both sides,
   since the cached prefix sees un-augmented images), same net, same seed, CPU on both sides.

Run from the project root after `dvc repro` (it reads data/prepared, models/backbone and models/heads):
    python benchmarks/finetune_prefix_cache.py [--images 256] [--unfreeze 2] [--reps 5] [--skip-epochs]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import Timing, interleaved, ratio_line, repeat  # noqa: E402
from transfer_learning.backbone import files as backbone_files  # noqa: E402
from transfer_learning.features.extract import compute  # noqa: E402
from transfer_learning.features.runtime import FeatureRunner  # noqa: E402
from transfer_learning.features.store import FeatureStore  # noqa: E402
from transfer_learning.features.views import ViewDataset  # noqa: E402
from transfer_learning.finetune.data import LabelledImages, checked, loader, split_images  # noqa: E402
from transfer_learning.finetune.loop import fit  # noqa: E402
from transfer_learning.finetune.model import FineTuneNet  # noqa: E402
from transfer_learning.finetune.prefix import FlatPrefix, checked_export, frozen_prefix, kept_path, recipe  # noqa: E402
from transfer_learning.finetune.run import WORKERS, inputs_for  # noqa: E402
from transfer_learning.heads import files as head_files  # noqa: E402
from transfer_learning.layers.kept import record_of  # noqa: E402
from transfer_learning.params import ExportParams, FinetuneParams  # noqa: E402

NO_AUGMENT = {"random_resized_crop": False, "hflip": False, "color_jitter": 0.0}
CPU = torch.device("cpu")
PROVIDERS = ["CPUExecutionProvider"]
VAL_IMAGES = 64
BATCH = 32
PREFIX_BATCH = 64  # images per prefix call on both sides (the stage's)


def torch_prefix(net: FineTuneNet, images: LabelledImages, store_root: Path, preprocessing, shape) -> None:
    """The frozen prefix in torch into a store, as the stage computed it before it ran in ONNX Runtime."""
    keys = images.keys()
    with FeatureStore(store_root, "0" * 64, int(np.prod(shape))) as store:
        done = 0
        for batch, _, errors in loader(ViewDataset(images.requests, preprocessing), list(range(len(keys))),
                                       PREFIX_BATCH, WORKERS):
            out = net.prefix_output(preprocessing.normalize(checked(batch, errors)))
            store.add(keys[done:done + len(out)], out.reshape(len(out), -1).numpy())
            done += len(out)
        store.commit()
        store.compact()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="train images")
    parser.add_argument("--unfreeze", type=int, default=2)
    parser.add_argument("--init-head", default="logreg")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-epochs", action="store_true", help="part 1 only")
    args = parser.parse_args()
    if args.reps < 5:
        raise SystemExit(f"--reps {args.reps}: at least 5")
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("onnx_ir", "onnxscript", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    epochs = int(yaml.safe_load(Path("params.yaml").read_text())["finetune"]["epochs"])

    backbone = backbone_files.load()
    preprocessing = backbone.preprocessing
    head = head_files.load(args.init_head)
    full_train, full_val = split_images("train"), split_images("val")
    train = LabelledImages(full_train.requests[:args.images], full_train.labels[:args.images])
    val = LabelledImages(full_val.requests[:VAL_IMAGES], full_val.labels[:VAL_IMAGES])
    node = backbone.anatomy.cut_node("penultimate")

    def new_net() -> FineTuneNet:
        return FineTuneNet(backbone.model(), backbone.anatomy, node, "avg", args.unfreeze, "frozen", head,
                           len(head.classes), preprocessing.crop)

    net = new_net()
    print(f"MobileNetV2 @ {preprocessing.crop}, unfreeze={args.unfreeze} (prefix up to {net.split.prefix_node}), CPU "
          f"({torch.get_num_threads()} torch threads), {len(train)} train + {len(val)} val images, {args.reps} "
          "repetitions after 1 warm-up")
    with tempfile.TemporaryDirectory() as tmp:
        stores = iter(range(10 ** 6))

        def fresh_store() -> Path:
            return Path(tmp) / f"store-{next(stores)}"

        # 1. the prefix's one-time cost
        kept_store = fresh_store()
        prefix = frozen_prefix(net, backbone, node, preprocessing, ExportParams(), PROVIDERS, kept_store)

        def ort_side() -> None:
            replace(prefix, store=fresh_store()).rows(train, WORKERS)

        def torch_side() -> None:
            with torch.no_grad():
                torch_prefix(net, train, fresh_store(), preprocessing, prefix.shape)

        backbone_onnx = backbone_files.ONNX.read_bytes()

        def extract_side() -> None:
            runner = FeatureRunner(backbone_onnx, PROVIDERS, PREFIX_BATCH)
            with FeatureStore(fresh_store(), "0" * 64, runner.feature_dim) as store:
                compute(store, dict(zip(train.keys(), train.requests)), runner, preprocessing, PREFIX_BATCH, WORKERS)
                store.commit()
                store.compact()

        sides = interleaved({"onnx": ort_side, "torch": torch_side, "extract": extract_side}, reps=args.reps)
        onnx, eager, extract = sides["onnx"], sides["torch"], sides["extract"]
        print(f"  prefix in ONNX Runtime : {onnx}  ({onnx.rate(len(train)):6.1f} img/s)")
        print(f"  prefix in torch eager  : {eager}  ({eager.rate(len(train)):6.1f} img/s)")
        print(f"  extract's backbone     : {extract}  ({extract.rate(len(train)):6.1f} img/s)")
        print(ratio_line("  prefix throughput, ONNX Runtime / torch", eager.median / onnx.median, onnx, eager))
        print(ratio_line("  prefix throughput in ONNX Runtime / extract's", extract.median / onnx.median, onnx,
                         extract))

        module = FlatPrefix(net).eval()
        made_from = recipe(backbone, net, node, ExportParams().opset)
        path = kept_path(kept_store, made_from)

        def export_again() -> None:
            record_of(path).unlink()
            checked_export(module, made_from, path, preprocessing, ExportParams().atol)

        export = repeat(export_again, reps=args.reps)
        check = repeat(lambda: checked_export(module, made_from, path, preprocessing, ExportParams().atol),
                       reps=args.reps)
        print(f"  the prefix's export and parity check (once per backbone, cut, unfreeze): {export}")
        print(f"  a kept export's digest and parity check (every later run)               : {check}")
        if args.skip_epochs:
            return

        # 2. a whole run
        params = FinetuneParams(epochs=1 + args.reps, patience=2 + args.reps, batch_size=BATCH, augment=NO_AUGMENT)
        once: dict[bool, Timing] = {}
        epoch: dict[bool, Timing] = {}
        seconds: dict[bool, list[float]] = {False: [], True: []}
        prepared = {}
        for _rep in range(1 + args.reps):  # each into a fresh store, so the prefix is really computed; sides in turn
            for cached in (False, True):
                run_net = new_net()
                started = time.perf_counter()
                run_prefix = replace(prefix, store=fresh_store())
                train_inputs = inputs_for(train, None, run_prefix if cached else None, preprocessing, BATCH)
                val_inputs = inputs_for(val, None, run_prefix, preprocessing, BATCH)
                seconds[cached].append(time.perf_counter() - started)
                prepared[cached] = (run_net, train_inputs, val_inputs)
        for cached in (False, True):
            once[cached] = Timing(tuple(seconds[cached][1:]))
            run_net, train_inputs, val_inputs = prepared[cached]
            outcome = fit(run_net, train_inputs, val_inputs, params, 0, Path(tmp) / f"ckpt-{cached}.pt", CPU)
            per_epoch = [record["seconds"] for record in outcome.history if record["epoch"] >= 1]
            if len(per_epoch) != 1 + args.reps:
                raise SystemExit(f"fit stopped after {len(per_epoch)} epochs; expected {1 + args.reps}")
            epoch[cached] = Timing(tuple(per_epoch[1:]))

    full_run = once[False].median + epochs * epoch[False].median
    cached_run = once[True].median + epochs * epoch[True].median
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
