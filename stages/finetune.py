"""finetune: models/backbone + an init head from train_heads -> models/finetune/ (model.onnx, model.pt, meta.json,
test_scores.npz) + metrics/finetune.json + plots/finetune/ (dvclive curves).

LP-FT: the head starts as the linear probe trained on cached features (finetune.init_head), then the last
`finetune.unfreeze` blocks and the head train together at low learning rates (transfer_learning/finetune/).
With finetune.enabled false (the default) the stage only records that it was skipped.
"""
from transfer_learning.common.errors import run_main
from transfer_learning.common.metrics import write_metrics
from transfer_learning.finetune.run import finetune
from transfer_learning.params import load_params


def main() -> None:
    # backbone.* is not checked against torchvision: a disabled run must cost next to nothing (see finetune())
    params = load_params(resolve_estimators=False, resolve_backbone=False)
    write_metrics("finetune", finetune(params))


if __name__ == "__main__":
    run_main(main)
