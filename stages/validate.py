"""validate: params.yaml -> data/params.ok, the first stage of every `dvc repro`.

Each other stage declares only the params it reads, so a typo in a key no stage reads (`backbone.cutt`) would
change nothing DVC looks at. This stage depends on the whole params.yaml file and every other stage depends on
its output, so an invalid params.yaml stops the pipeline before any work, even when everything else is cached.
The output holds a fixed text: after a valid edit DVC sees the same output and re-runs only the stages whose own
params changed.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from transfer_learning.common.errors import run_main
from transfer_learning.params import PARAMS_FILE, load_params

log = logging.getLogger("validate")
VALIDATED = Path("data/params.ok")


def main() -> None:
    started = time.perf_counter()
    # keys, types and ranges first; then arch, weights and estimators, looked up in the catalog of what torchvision
    # and scikit-learn offer (common/catalog.py: listed once per installed version, so no import of either here)
    load_params(resolve_estimators=False, resolve_backbone=False)
    load_params()
    VALIDATED.parent.mkdir(parents=True, exist_ok=True)
    VALIDATED.write_text(f"{PARAMS_FILE} is valid\n")  # the same bytes for every valid params.yaml
    log.info("%s is valid (%.2f s)", PARAMS_FILE, time.perf_counter() - started)


if __name__ == "__main__":
    run_main(main)
