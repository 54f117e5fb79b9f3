"""python -m stages.store list | verify | gc: upkeep of the feature store (extract.store, or --store).

  list            every fingerprint folder: rows, MB, files, rejected files, last use, and under it what the
                  fingerprint stands for (backbone, cut, pooling, precision, dtype, input); every fine-tune folder
                  (a run's checkpoints, or the kept frozen-prefix export)
  verify          every file checked as a run checks it (digests, finite features); a bad one is moved aside
                  (its rows are recomputed by the next run) and named; exit status 1 if any
  gc [--dry-run]  deletes what this repo does not refer to and nothing used for --days days; stops, deleting
                  nothing, when it cannot read what a revision refers to (--force: dangerous, see gc --help)

Only the store's own folders (`<64-hex fingerprint>/` with its `.lock` beside it, `finetune/<64-hex run>/`) are
read, moved or deleted; anything else in the folder is named once and left alone. What gc keeps is documented in
transfer_learning/features/upkeep.py.
"""
import argparse
from pathlib import Path

from transfer_learning.common.errors import UserError, run_main
from transfer_learning.features.store import resolve_store
from transfer_learning.features.upkeep import gc, list_store, verify


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", help="the store folder (default: extract.store in params.yaml)")
    parser = argparse.ArgumentParser(prog="python -m stages.store", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", parents=[common], help="fingerprints with what they stand for, rows, size, files and last use")
    commands.add_parser("verify", parents=[common], help="check every file; move bad ones aside; exit 1 if any")
    collect = commands.add_parser("gc", parents=[common], help="delete what nothing refers to (see the module doc)")
    collect.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    collect.add_argument("--days", type=float, default=14.0,
                         help="keep anything used (and rejected files moved aside) in the last DAYS days (default 14)")
    collect.add_argument("--commits", type=int, default=50,
                         help="how many recent commits of all branches, tags and remotes refer (default 50)")
    collect.add_argument("--force", action="store_true",
                         help="DANGEROUS: when git, DVC's cache or a metrics file cannot be read for some revision, "
                              "go on with what could be read instead of stopping; store folders only those "
                              "revisions use are then deleted unless used within --days")
    args = parser.parse_args(argv)

    if args.store:
        store = Path(args.store)
    else:
        from transfer_learning.params import load_params

        store = resolve_store(load_params(resolve_estimators=False, resolve_backbone=False).extract.store)
    if not store.is_dir():
        raise UserError(f"no feature store at {store}: give --store, or run from the project's root after extract")
    if args.command == "list":
        return list_store(store)
    if args.command == "verify":
        return verify(store)
    if args.days < 0 or args.commits < 0:
        raise UserError("--days and --commits must be 0 or more")
    return gc(store, args.days, args.commits, args.dry_run, args.force)


if __name__ == "__main__":
    run_main(main)
