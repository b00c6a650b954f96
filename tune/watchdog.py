"""Clean-up after a local sweep however its driver ends: Ray's leftover processes and the temp folder it made.

Ray's core processes die with their driver, but its two agents first try for 60 s (a fixed timeout in Ray) to
report the raylet's death, and a driver killed with SIGKILL runs no `finally`, so the sweep's temp folder would
stay. `start` runs this file as a process of its own session that holds the read end of a pipe whose write end
only the driver has: the pipe reaches end-of-file when the driver exits, however it exits. Then the sweep's
processes are killed, the driver itself excepted, and the folder is removed. A process is the sweep's when

- its environment holds the sweep's Ray token (Ray's processes and a trial's launched ranks inherit the
  driver's environment; the token is fresh per sweep, see `tune.trials.local_ray_environment`), or
- it holds a file open under a folder the driver named with `watch` (Ray's session folder: every Ray process
  writes its logs there). This second test is needed because Ray's agents rename themselves with
  setproctitle, which can overwrite the memory /proc/PID/environ reads, so their token is not always visible.

Killing repeats until a pass over /proc finds nothing, so a process started by one that was being killed is
found on the next pass. The token travels on the pipe, not on the command line, which every user of the
machine can read. Linux only (/proc); elsewhere the folder is still removed.

Only the standard library: it starts in a fresh interpreter in well under a second.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

TOKEN_ENV = "RAY_AUTH_TOKEN"


def start(folder: Optional[str]) -> subprocess.Popen:
    """Start the watchdog for the Ray of this process (its token from the environment) and `folder` (None:
    remove nothing, e.g. a folder the user chose)."""
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}  # not one of the processes it kills
    proc = subprocess.Popen([sys.executable, "-I", __file__, str(os.getpid()), *([folder] if folder else [])],
                            stdin=subprocess.PIPE, env=env, start_new_session=True)  # Ctrl-C does not reach it
    assert proc.stdin is not None
    proc.stdin.write(f"{os.environ[TOKEN_ENV]}\n".encode())
    proc.stdin.flush()
    return proc


def watch(proc: subprocess.Popen, folder: str) -> None:
    """Also kill the processes that hold a file open under `folder` (Ray's session folder, known once Ray runs)."""
    assert proc.stdin is not None
    proc.stdin.write(f"{os.path.realpath(folder)}\n".encode())  # as /proc/PID/fd links read
    proc.stdin.flush()


def stop(proc: subprocess.Popen) -> None:
    """The driver's normal exit, after `ray.shutdown()`: end the pipe and wait for the clean-up to finish."""
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait()


def _is_sweeps(entry: Path, needle: bytes, folders: tuple[str, ...]) -> bool:
    """Whether the process at /proc/PID `entry` holds the token or a file open under one of `folders`."""
    if needle in (entry / "environ").read_bytes().split(b"\0"):
        return True
    for fd in (entry / "fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if any(target.startswith(folder + os.sep) for folder in folders):
            return True
    return False


def reap(token: str, folders: tuple[str, ...], spare: int, passes: int = 100) -> list[int]:
    """SIGKILL every process (but `spare` and this one) that is the sweep's (see the module docstring), pass
    after pass until one finds none; return the pids killed. `passes` bounds it for a process that cannot die
    (uninterruptible sleep): a process killed on one pass may still be listed, briefly, on the next."""
    needle, killed = f"{TOKEN_ENV}={token}".encode(), []
    for _ in range(passes):
        found = []
        for entry in Path("/proc").glob("[0-9]*"):
            pid = int(entry.name)
            if pid in (spare, os.getpid()):
                continue
            try:
                if _is_sweeps(entry, needle, folders):
                    os.kill(pid, signal.SIGKILL)
                    found.append(pid)
            except (OSError, ValueError):  # gone meanwhile, or not ours to read
                continue
        if not found:
            break
        killed.extend(pid for pid in found if pid not in killed)
        time.sleep(0.05)  # let the killed exit before the next pass looks again
    return killed


def main(argv: list[str]) -> None:
    driver, folder = int(argv[0]), (argv[1] if len(argv) > 1 else None)
    token = sys.stdin.readline().strip()
    folders = tuple(sys.stdin.read().splitlines())  # `watch` lines; read() returns when the driver is gone
    if token:
        reap(token, folders, spare=driver)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
