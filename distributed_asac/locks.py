"""One process at a time in a run folder or a sweep folder; and `flocked`, one process at a time making a shared
thing (an image cache, a generated dataset, a new tracking store) that the others then use.

A second driver on a running sweep deleted the running trials' folders and MLflow runs, and two resumes of one
run raced to rename its saved state. So the process that runs in such a folder holds `<folder>/LOCK`, created
exclusively (O_EXCL) and naming its pid and host; a second one refuses in one line naming the holder. The lock
of a process that died on this host (its pid is gone) is stale and taken over with a warning; a holder on
another host cannot be checked from here, so the line says to delete the file if that process is gone.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from .errors import UserError
from .files import atomic_write

LOCK = "LOCK"


def holder(text: str) -> Optional[tuple[int, str]]:
    """(pid, host) named by a lock file or an INCOMPLETE marker ("pid <n> on <host>;"), None if unreadable."""
    found = re.search(r"pid (\d+) on ([^\s;]+);", text)
    return (int(found.group(1)), found.group(2)) if found else None


def gone(pid: int, host: str) -> bool:
    """Whether process `pid` of `host` is known to have ended (only a process of this host can be checked)."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def acquire(folder: Path, what: str, proceed: str) -> Path:
    """Take `folder`'s lock for this process, or raise a UserError naming its holder. `what` names the folder
    in the message ("run folder", "sweep folder"), `proceed` what to do once the holder has finished."""
    path = folder / LOCK
    mine = f"pid {os.getpid()} on {socket.gethostname()}; token {uuid.uuid4().hex}\n"
    while True:
        try:
            with open(path, "x") as f:  # exclusive: of two processes only one creates it
                f.write(mine)
            return path
        except FileExistsError:
            pass
        try:
            stale = path.read_text(errors="replace")
        except FileNotFoundError:  # released between our two calls: try again
            continue
        found = holder(stale)
        if found is None or not gone(*found):
            raise UserError(_refusal(folder, path, found, what, proceed))
        _take_over(path, stale, mine)
        logging.getLogger(__name__).warning("took over the stale lock %s of pid %d on %s (no longer running)",
                                            path, *found)
        return path


def _take_over(path: Path, stale: str, mine: str) -> None:
    """Replace the stale lock text `stale` with `mine`. Of several processes that found the same stale lock, only
    the one that creates its claim file (named after the stale lock's token) goes on; the claim stays until the
    new holder releases, so a late process that read the stale text cannot replace the new holder's lock."""
    claim = _claim(stale)
    try:
        with open(path.parent / claim, "x"):
            pass
    except FileExistsError:
        raise UserError(f"{path.parent} is being taken over by another process (its lock {path} was stale); "
                        "wait for that process, then rerun") from None
    atomic_write(path, f"{mine.rstrip()}; took over {claim}\n")


def _claim(text: str) -> str:
    token = re.search(r"token (\w+)", text)
    return f".{LOCK}.claim-{token.group(1) if token else 'none'}"


def _refusal(folder: Path, path: Path, found: Optional[tuple[int, str]], what: str, proceed: str) -> str:
    if found is None:
        return f"{what} {folder} is locked ({path} names no process); if no process uses it, delete {path} and rerun"
    pid, host = found
    if host == socket.gethostname():
        return (f"{what} {folder} is in use by pid {pid} on this host ({host}; lock {path}); wait for it to "
                f"finish or stop it (kill {pid}), then {proceed}")
    return (f"{what} {folder} is in use by pid {pid} on {host} (lock {path}); wait for it to finish or stop it "
            f"there, then {proceed}; if it no longer runs, delete {path} first")


def release(path: Path) -> None:
    """Remove the lock (and the claim of a takeover) if it is still this process's: never another's."""
    text = path.read_text(errors="replace") if path.is_file() else ""
    if holder(text) != (os.getpid(), socket.gethostname()):
        return
    took = re.search(r"took over (\S+)", text)
    path.unlink()
    if took:
        (path.parent / took.group(1)).unlink(missing_ok=True)


@contextmanager
def locked(folder: Path, what: str, proceed: str) -> Iterator[Path]:
    """Hold `folder`'s lock for the block (see `acquire`)."""
    path = acquire(folder, what, proceed)
    try:
        yield path
    finally:
        release(path)


@contextmanager
def flocked(path: Path, waiting: str) -> Iterator[None]:
    """Hold an flock on `path` (created if missing) for the block, logging `waiting` when another process holds it
    first; the kernel drops it if the holder dies, so a crash never wedges the others. The file stays: removing it
    while another process waits on it would let a third lock a new file beside the waiting one."""
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.getLogger(__name__).info("%s", waiting)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
