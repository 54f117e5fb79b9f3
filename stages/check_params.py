"""check_params: params.yaml -> reports/params_check.txt.

Validates the whole of params.yaml (transfer_learning/params.py) and fails naming every bad key. Every other stage
depends on its output, so `dvc repro` stops on a mistyped key before any work. The stages declare only the params
that can change their results; an edit to any other key (a machine setting such as extract.workers, a comment)
re-runs this check alone: its output's text never changes, so nothing downstream sees a change.
"""
from pathlib import Path

from transfer_learning.common.atomic import atomic_write_text
from transfer_learning.common.errors import run_main
from transfer_learning.params import PARAMS_FILE, load_params

CHECKED = Path("reports/params_check.txt")


def main() -> None:
    load_params()
    atomic_write_text(CHECKED, f"{PARAMS_FILE} is valid (python -m stages.check_params). Every stage depends on "
                               "this file, so that `dvc repro` checks the params before any work.\n")
    print(f"{PARAMS_FILE}: every key known and every value valid")


if __name__ == "__main__":
    run_main(main)
