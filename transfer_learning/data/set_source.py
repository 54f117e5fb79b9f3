"""`python -m transfer_learning.data.set_source SOURCE`: data.source in params.yaml becomes SOURCE, what
`make run SOURCE=<folder or CSV>` does before it runs the pipeline.

A folder or CSV is written as its absolute path, so that the same params.yaml finds it from a temp copy of the
project (`dvc exp run --temp`, the queue); a built-in name (fashion-mnist, digits) is written as it is. The file is
rewritten by ruamel.yaml's round trip, the YAML writer `dvc exp run -S` uses too: its comments and layout stay.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

from transfer_learning.common.atomic import atomic_write_text
from transfer_learning.common.errors import UserError, run_main
from transfer_learning.params import BUILTIN_SOURCES, PARAMS_FILE


def source_value(source: str) -> str:
    """What params.yaml's data.source holds for SOURCE; a UserError when it is none of the valid kinds."""
    if source in BUILTIN_SOURCES:
        return source
    path = Path(source).expanduser().resolve()
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".csv"):
        return path.as_posix()
    raise UserError(f"SOURCE={source}: not a folder of <class>/<image> files, nor a CSV file with path,label[,split] "
                    f"columns, nor a built-in source ({', '.join(BUILTIN_SOURCES)}); params.yaml is unchanged")


def set_source(source: str, params_file: Path = PARAMS_FILE) -> str:
    """Writes data.source into params_file; returns the value written."""
    from ruamel.yaml import YAML  # DVC's own dependency

    value = source_value(source)
    yaml = YAML()
    yaml.width = 4096  # no line is re-wrapped
    yaml.preserve_quotes = True
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    params = yaml.load(params_file.read_text())
    if not isinstance(params, dict) or not isinstance(params.get("data"), dict):
        raise UserError(f"{params_file}: has no data: section to set data.source in")
    if params["data"].get("source") == value:
        return value
    params["data"]["source"] = value
    text = io.StringIO()
    yaml.dump(params, text)
    atomic_write_text(params_file, text.getvalue())
    return value


def main() -> None:
    if len(sys.argv) != 2 or not sys.argv[1].strip():
        raise UserError("usage: python -m transfer_learning.data.set_source <folder | CSV | fashion-mnist | digits>")
    print(f"{PARAMS_FILE}: data.source: {set_source(sys.argv[1])}")


if __name__ == "__main__":
    run_main(main)
