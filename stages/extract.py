"""extract: data/prepared + models/backbone.onnx -> data/features/{train,val,test}.h5 + metrics/extract.json
+ reports/timings/extract.json.

Only rows missing from the feature store (extract.store, not a DVC output) are computed: new images, a backbone
or cut never seen before (transfer_learning/features/extract.py).
"""
from transfer_learning.common.errors import run_main
from transfer_learning.common.metrics import pop_timings, write_metrics, write_timings
from transfer_learning.features.extract import extract
from transfer_learning.params import load_params


def main() -> None:
    params = load_params().extract
    metrics = extract(params)
    write_timings("extract", pop_timings(metrics))
    write_metrics("extract", metrics)


if __name__ == "__main__":
    run_main(main)
