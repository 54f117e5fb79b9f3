"""evaluate: data/features/test.h5 + models/heads + models/finetune -> metrics/evaluate.json (test metrics),
plots/confusion/<model>.csv, reports/confusion/<model>.png and reports/summary.md (val and test side by side, the
training times from reports/timings/).

The best model is the best on val; test accuracy is reported beside it and chooses nothing
(transfer_learning/evaluate/run.py).
"""
from transfer_learning.common.errors import run_main
from transfer_learning.common.metrics import write_metrics
from transfer_learning.evaluate.run import evaluate
from transfer_learning.params import load_params


def main() -> None:
    params = load_params()
    write_metrics("evaluate", evaluate(params.evaluate.models, list(params.heads)))


if __name__ == "__main__":
    run_main(main)
