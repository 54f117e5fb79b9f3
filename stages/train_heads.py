"""train_heads: data/features/{train,val}.h5 -> models/heads/<name>/ + metrics/heads/<name>.json + plots/heads/<name>/.

`python -m stages.train_heads NAME` trains the head params.yaml `heads` names NAME: dvc.yaml runs one such stage
per head (train_heads@<name>), so a one-head edit retrains one head. With no name it trains every head, replaces
all of models/heads, and also writes metrics/heads.json (in the pipeline, evaluate gathers that file).
"""
import sys

from transfer_learning.common.errors import run_main
from transfer_learning.heads.records import write_combined
from transfer_learning.params import load_params

# scikit-learn imports pandas when it is installed (Ray Data needs it) only to keep it at hand (sklearn.utils.fixes);
# no head uses it. Hidden while scikit-learn is imported, importable again after: ~0.25 s of every head edit.
PANDAS_HIDDEN = "pandas" not in sys.modules
if PANDAS_HIDDEN:
    sys.modules["pandas"] = None  # `import pandas` raises ImportError, which scikit-learn expects
try:
    from transfer_learning.heads.train import train_heads
finally:
    if PANDAS_HIDDEN:
        del sys.modules["pandas"]


def main(names: list[str] | None = None) -> None:
    heads = load_params().heads
    train_heads(heads, only=names)
    if not names:
        write_combined(list(heads))


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
