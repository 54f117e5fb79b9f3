"""train_heads: data/features/{train,val}.h5 -> models/heads/<name>/ + metrics/heads.json.

Every head in params.yaml `heads` chooses its hyperparameters on val (transfer_learning/heads/).
"""
from transfer_learning.common.errors import run_main
from transfer_learning.common.metrics import write_metrics
from transfer_learning.heads.train import train_heads
from transfer_learning.params import load_params


def main() -> None:
    write_metrics("heads", train_heads(load_params(resolve_backbone=False).heads))


if __name__ == "__main__":
    run_main(main)
