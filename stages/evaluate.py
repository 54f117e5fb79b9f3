"""evaluate: not implemented yet (issue #4); the stage is declared in dvc.yaml so that the DAG is already final."""
from stages.core.errors import UserError, run_main


def main() -> None:
    raise UserError("stage 'evaluate' is not implemented yet (issue #4); run `dvc repro export` for the stages that are")


if __name__ == "__main__":
    run_main(main)
