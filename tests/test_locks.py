"""One process at a time in a run or sweep folder (distributed_asac/locks.py): a second one is refused naming the
holder, a dead holder's lock on this host is taken over, a holder elsewhere is never guessed dead."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed_asac.errors import UserError
from distributed_asac.failpoints import PAUSE_AT, PAUSE_DIR, RELEASE
from distributed_asac.locks import LOCK, acquire, holder, locked, release

REPO = Path(__file__).resolve().parents[1]

HOLD = f"""
import sys
from pathlib import Path
from distributed_asac.failpoints import failpoint
from distributed_asac.locks import locked
with locked(Path(sys.argv[1]), "run folder", "rerun"):
    failpoint("test.holding")
"""


def _dead_pid() -> int:
    """The pid of a process that has exited."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_second_process_is_refused_while_the_first_holds_the_lock(tmp_path):
    folder, pauses = tmp_path / "run", tmp_path / "pauses"
    folder.mkdir()
    pauses.mkdir()
    env = {**os.environ, PAUSE_AT: "test.holding", PAUSE_DIR: str(pauses), "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not list(pauses.glob("test.holding.*.reached")):  # the first now holds the lock
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(UserError, match=rf"run folder {folder} is in use by pid {first.pid} on this host "
                                            rf"\({socket.gethostname()}; lock .*{LOCK}\); wait for it to finish or "
                                            rf"stop it \(kill {first.pid}\), then go on"):
            acquire(folder, "run folder", "go on")
        assert holder((folder / LOCK).read_text()) == (first.pid, socket.gethostname())  # the refusal changed nothing
        (pauses / RELEASE).write_text("")
        assert first.wait(timeout=120) == 0
    finally:
        first.kill()
    assert not (folder / LOCK).exists()  # released by its holder
    with locked(folder, "run folder", "go on"):  # free again
        assert holder((folder / LOCK).read_text()) == (os.getpid(), socket.gethostname())


def test_a_dead_holders_lock_is_taken_over_with_a_warning_once(tmp_path, caplog):
    dead = _dead_pid()
    (tmp_path / LOCK).write_text(f"pid {dead} on {socket.gethostname()}; token abc\n")
    with caplog.at_level(logging.WARNING):
        path = acquire(tmp_path, "run folder", "go on")
    assert f"took over the stale lock {path} of pid {dead}" in caplog.text
    assert holder(path.read_text()) == (os.getpid(), socket.gethostname())
    assert (tmp_path / f".{LOCK}.claim-abc").exists()  # a late process that read the stale lock cannot replace ours
    release(path)
    assert list(tmp_path.iterdir()) == []  # the lock and its claim are gone


def test_of_two_processes_taking_over_one_stale_lock_the_second_is_refused(tmp_path):
    """The first made its claim on the stale lock's token and has not yet replaced the lock."""
    (tmp_path / LOCK).write_text(f"pid {_dead_pid()} on {socket.gethostname()}; token abc\n")
    (tmp_path / f".{LOCK}.claim-abc").write_text("")
    with pytest.raises(UserError, match="is being taken over by another process"):
        acquire(tmp_path, "run folder", "go on")


def test_a_holder_on_another_host_is_never_taken_over(tmp_path):
    (tmp_path / LOCK).write_text(f"pid {_dead_pid()} on another-host; token abc\n")
    with pytest.raises(UserError, match=r"in use by pid \d+ on another-host .*if it no longer runs, delete .*LOCK"):
        acquire(tmp_path, "sweep folder", "go on")


def test_release_leaves_another_processs_lock_alone(tmp_path):
    path = tmp_path / LOCK
    path.write_text(f"pid {_dead_pid()} on {socket.gethostname()}; token abc\n")
    release(path)
    assert path.exists()
