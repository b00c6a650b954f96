"""The one exception type that entry points turn into a single clear error line."""

import errno
import sqlite3
import sys
from contextlib import contextmanager


class UserError(Exception):
    """Bad input from the user (config, data, paths): the message names the problem and the fix."""


@contextmanager
def exit_on_user_error():
    """Print a UserError as one line on stderr and exit with status 2 (no traceback). A full disk is the
    user's to fix too: it gets one line naming the file that could not be written (the files of finished
    runs are written atomically, so nothing earlier is damaged), or the MLflow store when its sqlite file
    could not grow (sqlite rolls the failed write back, so the store's earlier records are intact)."""
    try:
        yield
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" while writing {err.filename}" if err.filename else ""
        print(f"error: no space left on the device{where}; free some space or point output_dir (and the "
              "tracking store) at another disk, then rerun (resume=latest continues an interrupted run)",
              file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        if not _sqlite_full(err):
            raise
        print("error: the MLflow tracking store is full (sqlite: database or disk is full); free space on its "
              "disk or point tracking.uri at another store, then rerun (resume=latest continues an interrupted "
              "run)", file=sys.stderr)
        sys.exit(2)


def _sqlite_full(err: BaseException) -> bool:
    """Whether `err` comes from sqlite's SQLITE_FULL, however wrapped (MLflow wraps SQLAlchemy's error, which
    wraps sqlite3's)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, sqlite3.OperationalError) and "database or disk is full" in str(err):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def one_line(err: UserError) -> str:
    """The message of `err` as one line. A UserError raised in a DataLoader worker is re-raised by torch with
    the worker's traceback as its message ("Caught X in DataLoader worker process 0.\nOriginal Traceback
    ...\nmodule.X: message"): its last line holds the original message."""
    text = str(err).strip()
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split("\n"))
