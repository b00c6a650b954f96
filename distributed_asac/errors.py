"""The one exception type that entry points turn into a single clear error line."""

import errno
import shlex
import signal
import sqlite3
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional


class UserError(Exception):
    """Bad input from the user (config, data, paths): the message names the problem and the fix."""


# Faults of a path the user gave (a config key, a file argument): what to do about each.
PATH_FAULTS = {
    errno.ENAMETOOLONG: "give a shorter path",
    errno.ELOOP: "the path runs through a loop of symbolic links: fix the links or give another path",
    errno.EACCES: "give a path this user may read and write (or fix its permissions)",
    errno.EROFS: "give a path on a writable file system",
    errno.ENOTDIR: "a part of the path is a file, not a folder: give another path",
    errno.EFBIG: ("the file is too large for its file system or for this process's file size limit (ulimit -f): "
                  "raise the limit or give a path on another file system"),
}


class ResumableError(UserError):
    """A fault that stops a run whose folder stays resumable (a tracking store another process kept locked): its
    message ends with what to do; `exit_on_user_error` adds the command that resumes the run folder (`run_dir`,
    set by `interrupted_in`), or "then rerun" without one."""

    def __init__(self, message: str, run_dir: Optional[Path] = None):
        super().__init__(message)
        self.run_dir = run_dir


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM, with the run folder it stopped (None: before the run had one)."""

    def __init__(self, signum: int = signal.SIGINT, run_dir: Optional[Path] = None):
        super().__init__(signum, run_dir)
        self.signum, self.run_dir = signum, run_dir


def _terminate(signum: int, frame) -> None:
    raise Interrupted(signum)


@contextmanager
def interrupted_in(run_dir: Path) -> Iterator[None]:
    """Name `run_dir` on an interrupt or a ResumableError raised in the block, so that the command can say how to
    resume it; an outer folder (a comparison's) replaces an inner one (its seed's)."""
    try:
        yield
    except KeyboardInterrupt as err:
        raise Interrupted(getattr(err, "signum", signal.SIGINT), run_dir) from None
    except ResumableError as err:
        err.run_dir = run_dir
        raise


@contextmanager
def exit_on_user_error(command: Optional[list[str]] = None):
    """Print a UserError as one line on stderr and exit with status 2 (no traceback). A full disk is the
    user's to fix too: it gets one line naming the file that could not be written (the files of finished
    runs are written atomically, so nothing earlier is damaged), or the MLflow store when its sqlite file
    could not grow (sqlite rolls the failed write back, so the store's earlier records are intact).
    With `command` (the command line that resumes with `resume=<run folder>`), Ctrl-C and SIGTERM are one line
    too, "interrupted; resume with: <command>", and exit 130 (SIGINT) or 143 (SIGTERM): the block's MLflow runs
    are left KILLED (tracking.Tracker) and its run folder keeps its INCOMPLETE marker; a ResumableError's line
    ends with that command too ("..., then resume with: <command>")."""
    previous = signal.signal(signal.SIGTERM, _terminate) if command is not None else None
    try:
        yield
    except KeyboardInterrupt as err:
        if command is None:
            raise
        signum, run_dir = getattr(err, "signum", signal.SIGINT), getattr(err, "run_dir", None)
        if run_dir is None:
            print(f"interrupted before a run folder existed; nothing to resume: rerun {shlex.join(command)}",
                  file=sys.stderr)
        else:
            print(f"interrupted; resume with: {shlex.join(resume_command(command, run_dir))}", file=sys.stderr)
        sys.exit(128 + signum)
    except UserError as err:
        then = ""
        if isinstance(err, ResumableError):
            then = (f", then resume with: {shlex.join(resume_command(command, err.run_dir))}"
                    if command is not None and err.run_dir is not None else ", then rerun")
        print(f"error: {one_line(err)}{then}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno in PATH_FAULTS and err.filename:
            print(f"error: {err.filename}: {err.strerror}; {PATH_FAULTS[err.errno]}, then rerun", file=sys.stderr)
            sys.exit(2)
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" while writing {err.filename}" if err.filename else ""
        print(f"error: no space left on the device{where}; free some space or point output_dir (data.cache_dir, "
              "the tracking store) at another disk, then rerun (resume=latest continues an interrupted run)",
              file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        if store_full(err):
            print("error: the MLflow tracking store is full (sqlite: database or disk is full); free space on its "
                  "disk or point tracking.uri at another store, then rerun (resume=latest continues an interrupted "
                  "run)", file=sys.stderr)
            sys.exit(2)
        failed = cause(err, lambda e: any(sign in str(e) for sign in WRITE_FAILED))
        if failed is None:
            raise
        reason = str(failed).strip().splitlines()[0][-200:]
        print(f"error: a file could not be written ({type(failed).__name__}: {reason}), most likely because the disk "
              "or quota is full; free some space or point output_dir at another disk, then rerun (resume=latest "
              "continues an interrupted run)", file=sys.stderr)
        sys.exit(2)
    finally:
        if command is not None:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def resume_command(command: list[str], run_dir: Path) -> list[str]:
    """`command` (an entry point's command line) continuing the run in `run_dir`: its `resume=` replaced."""
    return [*(arg for arg in command if not arg.startswith("resume=")), f"resume={run_dir}"]


def module_command(module: str, argv: Optional[list[str]]) -> list[str]:
    """The command line that ran `python -m <module>` with `argv` (None: this process's own arguments)."""
    return [sys.executable, "-m", module, *(sys.argv[1:] if argv is None else argv)]


# How torch.save (its zip writer) and safetensors (an io::Error in its message) report a write that failed: a full
# disk inside torch.save printed 42 lines of C++ context.
WRITE_FAILED = ("file write failed", "StorageFull", "No space left on device", "Disk quota exceeded")


def cause(err: BaseException, matches: Callable[[BaseException], bool]) -> Optional[BaseException]:
    """The first exception in `err`'s chain that `matches`, however wrapped (MLflow wraps SQLAlchemy's error,
    which wraps sqlite3's), or None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if matches(err):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def store_full(err: BaseException) -> bool:
    """Whether `err`, however wrapped, is a sqlite tracking store that cannot grow (its disk, or its page limit)."""
    return cause(err, lambda e: isinstance(e, sqlite3.OperationalError) and "database or disk is full" in str(e)) is not None


def first_line(err: BaseException) -> str:
    """The first line of `err`'s message, or its type's name when it has none: what a one-line error quotes of a
    library's exception."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def one_line(err: UserError) -> str:
    """The message of `err` as one line. A UserError raised in a DataLoader worker is re-raised by torch with
    the worker's traceback as its message ("Caught X in DataLoader worker process 0.\nOriginal Traceback
    ...\nmodule.X: message"): its last line holds the original message."""
    text = str(err).strip()
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split("\n"))
