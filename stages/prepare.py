"""prepare: data.source -> data/prepared/{manifest.csv, classes.json, rejected.csv, decoding.json}
+ metrics/prepare.json.

Every image is read and decoded once; what cannot be used is listed in rejected.csv with the reason
(transfer_learning/data/prepare.py).
"""
from transfer_learning.common.errors import run_main
from transfer_learning.common.metrics import write_metrics
from transfer_learning.data.prepare import prepare
from transfer_learning.params import load_params


def main() -> None:
    write_metrics("prepare", prepare(load_params().data))


if __name__ == "__main__":
    run_main(main)
