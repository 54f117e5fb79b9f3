"""Predict classes of new images with the ONNX backbone and a trained head (not a DVC stage).

    python -m stages.predict IMAGES_OR_FOLDERS... [--model NAME] [--top-k K] [--json]
    python -m stages.predict --deploy [--model NAME]      # writes models/deploy/<name>.onnx

Folders are searched recursively for images. A file that cannot be read is reported, and the others are still
predicted; the exit status is then 1. The default model, for both, is the one evaluate chose: the best val
accuracy (what every model was tuned on; the test split only reports); the log says which. ONNX Runtime runs on
extract.providers. The code: transfer_learning/deploy/.
"""
import argparse

from transfer_learning.common.errors import run_main
from transfer_learning.deploy.predict import deploy, image_files, predict, report
from transfer_learning.deploy.served import model_to_serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.predict", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", metavar="IMAGES_OR_FOLDERS")
    parser.add_argument("--model", help="a trained head (models/heads/<name>) or finetune; default: the one "
                                        "evaluate chose, the best val accuracy")
    parser.add_argument("--top-k", type=int, default=3, help="classes to show per image (default 3)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--deploy", action="store_true", help="write models/deploy/<model>.onnx: uint8 pixels "
                                                              "in, probabilities out, no dependency on this repo")
    args = parser.parse_args(argv)
    if any(not given.strip() for given in args.inputs):  # Path("") is the current folder: never scan it unasked
        parser.error("an image or folder argument is empty (an unset shell variable?); name the files or folders, "
                     "`.` for the current folder")
    if args.deploy:
        if args.inputs:
            parser.error("--deploy writes the model's ONNX file and predicts nothing: give it no images or folders")
        print(deploy(args.model))
        return 0
    if not args.inputs:
        parser.error("give at least one image or folder")
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    model = model_to_serve(args.model)
    files, missing = image_files(args.inputs)
    return report(predict(files, model, args.top_k) + missing if files else missing, model, args.json)


if __name__ == "__main__":
    run_main(main)
