"""layers: the layer sweep (off by default). models/backbone + data/prepared -> one ONNX graph with a pooled output
per block, run once into the feature store, the logistic head per block chosen on val -> reports/layers.md,
plots/layers/accuracy.csv, metrics/layers.json (transfer_learning/layers/). `layers.enabled: false` writes a skip
record without importing torch."""
from transfer_learning.common.errors import run_main
from transfer_learning.layers.report import write_outputs, write_skipped
from transfer_learning.params import load_params


def main() -> None:
    params = load_params()
    if not params.layers.enabled:
        write_skipped()
        return
    from transfer_learning.layers.sweep import sweep  # torch, ONNX Runtime: only when the sweep runs

    write_outputs(sweep(params))


if __name__ == "__main__":
    run_main(main)
