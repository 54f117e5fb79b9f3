"""finetune: models/backbone + an init head from train_heads -> models/finetune/ (model.onnx, model.pt, meta.json,
test_scores.npz) + metrics/finetune.json + plots/finetune/ (dvclive curves) + reports/timings/finetune.json.

LP-FT: the head starts as the linear probe trained on cached features (finetune.init_head), then the last
`finetune.unfreeze` blocks and the head train together at low learning rates (transfer_learning/finetune/).
finetune.nproc (x nnodes) above 1 trains data-parallel in torchrun's workers; this stage waits for them.
With finetune.enabled false (the default) the stage only records that it was skipped, without importing torch.
"""
from transfer_learning.common.errors import run_main
from transfer_learning.common.metrics import write_stage_results
from transfer_learning.finetune.files import skip
from transfer_learning.params import load_params


def main() -> None:
    # disabled, the stage must cost next to nothing (it runs after every head edit: models/heads is its dep) and not
    # import torch
    params = load_params()
    if not params.finetune.enabled:
        write_stage_results("finetune", skip())  # no timing fields: an empty timings file
        return
    from transfer_learning.finetune.launch import finetune

    metrics = finetune(params)
    write_stage_results("finetune", metrics)


if __name__ == "__main__":
    run_main(main)
