"""extract: data/prepared + models/backbone.onnx -> data/features/{train,val,test}.h5 + metrics/extract.json
+ reports/timings/extract.json.

Only rows missing from the feature store (extract.store, not a DVC output) are computed: new images, a backbone
or cut never seen before (transfer_learning/features/extract.py).
"""
from transfer_learning.common.errors import run_main
from transfer_learning.common.metrics import write_stage_results
from transfer_learning.features.extract import extract
from transfer_learning.params import load_params


def main() -> None:
    params = load_params().extract
    metrics = extract(params)
    write_stage_results("extract", metrics)


if __name__ == "__main__":
    run_main(main)
