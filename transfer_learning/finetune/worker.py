"""One torchrun worker of a data-parallel fine-tune (launched by transfer_learning/finetune/launch.py): joins the
process group, trains as its rank, and on rank 0 writes the outputs and its metrics to --result. `@record` puts
an exception into torchrun's error file, which the launcher reports."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from transfer_learning.common.atomic import atomic_write_text
from transfer_learning.finetune.distributed import join
from transfer_learning.finetune.prefix import Checked
from transfer_learning.finetune.run import train
from transfer_learning.params import load_params


@record
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--checked-prefix", type=Path, help="the frozen prefix export the launcher checked")
    args = parser.parse_args()
    group = join()
    logging.basicConfig(level=logging.INFO if group.leader else logging.WARNING,
                        format=f"%(asctime)s rank {group.rank} %(name)s: %(message)s", datefmt="%H:%M:%S")
    checked = None if args.checked_prefix is None else Checked.read(args.checked_prefix)
    metrics = train(load_params(resolve_estimators=False, resolve_backbone=False), group, checked)
    if metrics is not None:
        atomic_write_text(args.result, json.dumps(metrics) + "\n")


if __name__ == "__main__":
    main()
