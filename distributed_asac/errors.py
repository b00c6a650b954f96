"""The one exception type that entry points turn into a single clear error line."""

import sys
from contextlib import contextmanager


class UserError(Exception):
    """Bad input from the user (config, data, paths): the message names the problem and the fix."""


@contextmanager
def exit_on_user_error():
    """Print a UserError as one line on stderr and exit with status 2 (no traceback)."""
    try:
        yield
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
