"""Which model predict and --deploy serve: the one named with --model, else the one evaluate chose (the best val
accuracy, evaluate/choice.py); the log says which and why. What is shown in reports/summary.md is what is served."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from transfer_learning.common.errors import UserError
from transfer_learning.evaluate.choice import BEST_KEY, EVALUATE_METRICS, best_first
from transfer_learning.finetune import files as finetune_files
from transfer_learning.heads import files as head_files

log = logging.getLogger("predict")


def read_json(path: Path, remedy: str) -> dict:
    """A JSON object from `path`, or a UserError naming the file and `remedy`."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {remedy}") from None
    except (UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{path} is not valid JSON ({error}): {remedy}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a {type(value).__name__}, not a JSON object: {remedy}")
    return value


def recorded_meta(model: str) -> dict:
    """What training recorded about a model (val accuracy, format), read without loading the model."""
    if model == finetune_files.MODEL_NAME:
        return finetune_files.read_meta()
    path = head_files.HEADS_DIR / model / "head.json"
    return read_json(path, f"restore it with `dvc checkout {path.parent}` or rebuild it with `dvc repro train_heads`")


def val_accuracy_of(model: str) -> float | None:
    return recorded_meta(model).get("val_accuracy")


def trained_models() -> list[str]:
    """The heads in models/heads alphabetically, then the fine-tuned model if there is one: evaluate's order."""
    return head_files.trained_names() + ([finetune_files.MODEL_NAME] if finetune_files.trained() else [])


@dataclass(frozen=True)
class Choice:
    name: str
    why: str  # for the log: how the model was chosen, with its val accuracy


def chosen_model() -> Choice:
    """The model evaluate chose (`best` in metrics/evaluate.json), once it is still trained and no model evaluate
    listed has a better val accuracy in its own record now (else evaluate is out of date: an error). Without that
    key (no metrics/evaluate.json yet, or one from before it), the same rule on the models' own records."""
    trained = trained_models()
    if not trained:
        raise UserError("no trained model in models/heads or models/finetune: run `dvc repro` first")
    remedy = f"restore it with `dvc checkout {EVALUATE_METRICS}` or `dvc repro evaluate` (or name the model: --model)"
    evaluated = read_json(EVALUATE_METRICS, remedy) if EVALUATE_METRICS.is_file() else {}
    listed = [name for name, entry in evaluated.items() if name != BEST_KEY and isinstance(entry, dict)]
    best = evaluated.get(BEST_KEY)
    if best is not None:
        out_of_date = f"{EVALUATE_METRICS} is out of date: run `dvc repro evaluate` (or name the model: --model)"
        if best not in trained:
            raise UserError(f"{EVALUATE_METRICS} names {best!r} as the best on val, and it is not trained; "
                            f"trained: {', '.join(trained)}. {out_of_date}")
        accuracy = val_accuracy_of(best)
        better = best_first([name for name in listed if name in trained
                             and (val_accuracy_of(name) or 0.0) > (accuracy or 0.0)], val_accuracy_of)
        if better:
            raise UserError(f"{EVALUATE_METRICS} names {best!r} (val accuracy {accuracy}) as the best on val, and "
                            f"{better[0]!r} has val accuracy {val_accuracy_of(better[0])} in its own record. "
                            f"{out_of_date}")
        return Choice(best, f"chosen by val accuracy {_accuracy(accuracy)}, the best of the {len(listed)} model(s) "
                            f"in {EVALUATE_METRICS} (evaluate's `{BEST_KEY}`)")
    candidates = [name for name in listed if name in trained] or trained
    name = best_first(candidates, val_accuracy_of)[0]
    where = f"{EVALUATE_METRICS} names no `{BEST_KEY}`" if evaluated else f"no {EVALUATE_METRICS} yet"
    return Choice(name, f"chosen by val accuracy {_accuracy(val_accuracy_of(name))}, the best of {len(candidates)} "
                        f"trained model(s) by their own records ({where})")


def _accuracy(value: float | None) -> str:
    return "none recorded" if value is None else f"{value:.4f}"


def model_to_serve(named: str | None) -> str:
    """`named` (--model), else the chosen model; says in the log which one and why."""
    if named is not None:
        if named == finetune_files.MODEL_NAME or (head_files.HEADS_DIR / named / "head.json").is_file():
            log.info("model %s: named with --model (its val accuracy %s)", named, _accuracy(val_accuracy_of(named)))
        return named
    choice = chosen_model()
    log.info("model %s: %s", choice.name, choice.why)
    return choice.name
