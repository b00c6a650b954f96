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
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)


def one_line(err: UserError) -> str:
    """The message of `err` as one line. A UserError raised in a DataLoader worker is re-raised by torch with
    the worker's traceback as its message ("Caught X in DataLoader worker process 0.\nOriginal Traceback
    ...\nmodule.X: message"): its last line holds the original message."""
    text = str(err).strip()
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split("\n"))
