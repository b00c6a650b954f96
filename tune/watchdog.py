"""Clean-up after a local sweep however its driver ends: Ray's leftover processes and the temp folder it made.

Ray's core processes die with their driver, but its two agents first try for 60 s (a fixed timeout in Ray) to
report the raylet's death, and a driver killed with SIGKILL runs no `finally`, so the sweep's temp folder would
stay. `start` runs this file as a process of its own session that holds the read end of a pipe whose write end
only the driver has: the pipe reaches end-of-file when the driver exits, however it exits. Then every process
whose environment holds the sweep's Ray token is killed (Ray's processes and a trial's launched ranks inherit
the driver's environment; the token is fresh per sweep, see `tune.sweep.local_ray_environment`), the driver
itself excepted, and the folder is removed. The token travels on the pipe, not on the command line, which
every user of the machine can read. Linux only (/proc); elsewhere the folder is still removed.

Only the standard library: it starts in a fresh interpreter in well under a second.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
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


def stop(proc: subprocess.Popen) -> None:
    """The driver's normal exit, after `ray.shutdown()`: end the pipe and wait for the clean-up to finish."""
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait()


def reap(token: str, spare: int) -> list[int]:
    """SIGKILL every process (but `spare` and this one) whose environment holds RAY_AUTH_TOKEN=token."""
    needle, killed = f"{TOKEN_ENV}={token}".encode(), []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid in (spare, os.getpid()):
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        except (OSError, ValueError):  # gone meanwhile, or not ours to read
            continue
    return killed


def main(argv: list[str]) -> None:
    driver, folder = int(argv[0]), (argv[1] if len(argv) > 1 else None)
    token = sys.stdin.readline().strip()
    sys.stdin.read()  # blocks until the driver closes the pipe or dies
    if token:
        reap(token, spare=driver)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
