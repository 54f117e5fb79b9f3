"""export: models/backbone + backbone.cut/pool -> models/backbone.onnx (dynamic batch) + metrics/export.json
+ reports/timings/export.json.

The ONNX file is checked against torch with ONNX Runtime on real photos at two batch sizes; above export.atol the
stage fails with the numbers (transfer_learning/backbone/export.py).
"""
from transfer_learning.backbone.export import check_parity, export_backbone
from transfer_learning.common.errors import run_main
from transfer_learning.common.metrics import write_stage_results
from transfer_learning.params import load_params


def main() -> None:
    params = load_params()
    metrics = export_backbone(params.backbone, params.export)
    write_stage_results("export", metrics)  # first: a failed check leaves its numbers
    check_parity(metrics)


if __name__ == "__main__":
    run_main(main)
