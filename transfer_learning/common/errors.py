"""The one exception type whose message is meant for the user, and the wrapper that shows it."""
import logging
import sys
from collections.abc import Callable
from typing import Optional


class UserError(Exception):
    """Bad input (params, files, data): the message names the key or file and what would be valid."""


def run_main(main: Callable[[], Optional[int]]) -> None:
    """Run a stage's main(): log at INFO, exit with what it returns, turn a UserError into one clear line and
    exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        status = main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status or 0)
