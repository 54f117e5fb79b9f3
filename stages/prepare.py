"""prepare: data.source -> data/prepared/{manifest.csv, classes.json, rejected.csv, decoding.json}
+ metrics/prepare.json + reports/timings/prepare.json.

Every image is read and decoded once; every file that is not used is listed in rejected.csv with the reason, and
a cap (data.per_class) that drops images is a warning and a metric (transfer_learning/data/prepare.py).
"""
from transfer_learning.common.errors import run_main
from transfer_learning.common.metrics import write_stage_results
from transfer_learning.data.prepare import prepare
from transfer_learning.params import load_params


def main() -> None:
    metrics = prepare(load_params().data)
    write_stage_results("prepare", metrics)


if __name__ == "__main__":
    run_main(main)
