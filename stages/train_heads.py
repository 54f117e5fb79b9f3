"""train_heads: data/features/{train,val}.h5 -> models/heads/<name>/ + metrics/heads/<name>.json + plots/heads/<name>/
+ reports/timings/heads/<name>.json.

`python -m stages.train_heads NAME` trains the head params.yaml `heads` names NAME: dvc.yaml runs one such stage
per head (train_heads@<name>), so a one-head edit retrains one head. With no name it trains every head and replaces
all of models/heads.
"""
import sys

from transfer_learning.common.errors import run_main
from transfer_learning.heads.train import train_heads
from transfer_learning.params import load_params


def main(names: list[str] | None = None) -> None:
    train_heads(load_params().heads, only=names)


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
