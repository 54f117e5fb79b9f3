"""finetune: with finetune.enabled false (the default) the stage only records that it was skipped, so that
`dvc repro` runs through and evaluate leaves the model out. Fine-tuning itself (partial unfreeze, LP-FT) is
issue #5; enabling it is an error until then."""
import json
import shutil
from pathlib import Path

from stages.core.config import load_params
from stages.core.errors import UserError, run_main
from stages.core.metrics import write_metrics

FINETUNE_DIR = Path("models/finetune")
PLOTS_DIR = Path("plots/finetune")


def main() -> None:
    # train_heads and evaluate are its neighbours in the DAG, so this runs after every heads edit: when disabled
    # it must cost next to nothing, hence no torchvision check of backbone.* (every earlier stage made it)
    params = load_params(resolve_estimators=False, resolve_backbone=False).finetune
    if params.enabled:
        raise UserError("finetune.enabled: fine-tuning is not implemented yet (issue #5); set it to false")
    shutil.rmtree(FINETUNE_DIR, ignore_errors=True)
    FINETUNE_DIR.mkdir(parents=True)
    (FINETUNE_DIR / "skipped.json").write_text(json.dumps({"enabled": False}) + "\n")
    PLOTS_DIR.mkdir(parents=True, exist_ok=True)
    write_metrics("finetune", {"skipped": True})
    print("finetune.enabled is false: skipped")


if __name__ == "__main__":
    run_main(main)
