"""advise: data/prepared + models/backbone -> metrics/advice.json + reports/advice.md + reports/timings/advise.json
(the similarity measurement's seconds).

Counts the train images per class, measures how close a seeded sample of them is to the backbone's pretraining
data (transfer_learning/advise/advisor.py), and recommends a strategy and its unfreeze depth from the quadrant
(small/large x similar/different). `finetune.unfreeze: auto` reads `unfreeze` from metrics/advice.json.
"""
from __future__ import annotations

import logging
from pathlib import Path

from transfer_learning.advise import advisor
from transfer_learning.backbone import files as backbone_files
from transfer_learning.common.allocator import keep_freed_memory
from transfer_learning.common.atomic import atomic_write_text
from transfer_learning.common.errors import UserError, run_main
from transfer_learning.common.metrics import write_metrics, write_timings
from transfer_learning.data import manifest
from transfer_learning.params import load_params

log = logging.getLogger("advise")
REPORT = Path("reports/advice.md")


def main() -> None:
    params = load_params().advise
    rows = manifest.read()
    counts = advisor.images_per_class(rows, manifest.read_classes())
    backbone = backbone_files.load()
    train = [r for r in rows if r.split == "train"]
    if not train:
        raise UserError(f"{manifest.MANIFEST} has no train images: lower data.val_fraction/test_fraction")

    measured = None
    if backbone.weights is None:
        log.info("backbone.weights is none (random init): no pretraining domain to measure similarity against")
    else:
        chosen = advisor.sample_rows(train, params.sample, params.seed)
        log.info("measuring similarity to %s's pretraining data on %d of %d train images (seed %d)",
                 backbone.weights, len(chosen), len(train), params.seed)
        keep_freed_memory()
        measured = advisor.measure(backbone.model(), backbone.preprocessing, [Path(r.path) for r in chosen])
        log.info("BN shift %s over %d BatchNorm layers, top-1 confidence %.3f, entropy %.3f, in %.1f s",
                 "n/a" if measured.bn_shift is None else f"{measured.bn_shift:.4f}", measured.bn_layers,
                 measured.top1_confidence, measured.entropy, measured.seconds)

    advice = advisor.advise(counts, measured, params, backbone.weights, [b.name for b in backbone.anatomy.blocks])
    write_metrics("advice", advice)
    write_timings("advise", {"seconds": round(measured.seconds, 2)} if measured else {})
    atomic_write_text(REPORT, advisor.report(advice))
    log.info("%s data (median %g train images per class), %s domain -> %s, finetune.unfreeze: %s -> %s",
             advice["size"], advice["images_per_class"]["median"], advice["domain"], advice["strategy"],
             advice["unfreeze"], REPORT)


if __name__ == "__main__":
    run_main(main)
