"""tune/watchdog.py: after the driver ends, normally or by SIGKILL, the processes holding the sweep's Ray token
are killed (the driver spared), and so are those holding a file open in a watched folder, and the folder the
sweep made is removed. Stand-ins for Ray's processes are `sleep`s carrying the token in their environment or
a file open; the tests wait on the watchdog's exit or the folder's removal, not on a timer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tune import watchdog

REPO = Path(__file__).resolve().parents[1]

DRIVER = """
import os, subprocess, sys, time
sys.path.insert(0, {repo!r})
from tune import watchdog
os.environ[watchdog.TOKEN_ENV] = "token-" + str(os.getpid())
watchdog.start(sys.argv[1])
agent = subprocess.Popen(["sleep", "600"])  # a Ray agent: inherits the token
bystander = subprocess.Popen(["sleep", "600"], env={{"PATH": os.environ["PATH"]}})  # no token: not Ray's
tmp = sys.argv[2] + ".tmp"
open(tmp, "w").write(f"{{agent.pid}} {{bystander.pid}}")
os.replace(tmp, sys.argv[2])
time.sleep(600)
"""


def _wait_until(condition, what: str, seconds: float = 120.0) -> None:
    """Poll a condition the test's own actions make true; the deadline only turns a hang into a failure."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_killed_driver_leaves_no_ray_process_and_no_folder(tmp_path, process_running):
    folder, pid_file = tmp_path / "asac-ray-x", tmp_path / "agent.pid"
    (folder / "r").mkdir(parents=True)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER.format(repo=str(REPO)), str(folder), str(pid_file)])
    _wait_until(pid_file.exists, "the stand-in driver to start its children")
    agent, bystander = map(int, pid_file.read_text().split())
    driver.send_signal(signal.SIGKILL)  # no finally, no handler
    driver.wait()
    _wait_until(lambda: not folder.exists(), "the watchdog to remove the folder")
    _wait_until(lambda: not process_running(agent), "the token holder to die")
    try:
        assert process_running(bystander)  # a process without the token is left alone
    finally:
        os.kill(bystander, signal.SIGKILL)


def test_normal_stop_spares_the_driver_and_removes_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(watchdog.TOKEN_ENV, f"token-test-{os.getpid()}")
    folder = tmp_path / "asac-ray-y"
    folder.mkdir()
    straggler = subprocess.Popen(["sleep", "600"])  # inherits the token, as a slow Ray agent would
    proc = watchdog.start(str(folder))
    watchdog.stop(proc)  # returns once the clean-up is done
    assert proc.returncode == 0 and not folder.exists()
    assert straggler.wait() == -signal.SIGKILL  # and this test process, which holds the token too, still runs


def test_user_folder_is_not_removed(tmp_path, monkeypatch):
    monkeypatch.setenv(watchdog.TOKEN_ENV, f"token-user-{os.getpid()}")
    watchdog.stop(watchdog.start(None))
    assert tmp_path.is_dir()


def test_holders_of_watched_files_are_killed_without_the_token(tmp_path, monkeypatch):
    """A Ray agent whose /proc environment was blanked by its renaming is still found by its open log file."""
    monkeypatch.setenv(watchdog.TOKEN_ENV, f"token-watch-{os.getpid()}")
    session, elsewhere = tmp_path / "session", tmp_path / "elsewhere"
    session.mkdir()
    elsewhere.mkdir()
    clean_env = {"PATH": os.environ["PATH"]}  # neither holds the token
    holder_cmd = 'exec 3>"$0/agent.log"; exec sleep 600'
    agent = subprocess.Popen(["sh", "-c", holder_cmd, str(session)], env=clean_env)
    bystander = subprocess.Popen(["sh", "-c", holder_cmd, str(elsewhere)], env=clean_env)
    try:
        _wait_until(lambda: (session / "agent.log").exists() and (elsewhere / "agent.log").exists(),
                    "the stand-ins to open their files")
        proc = watchdog.start(None)
        watchdog.watch(proc, str(session))
        watchdog.stop(proc)  # returns once the clean-up is done
        assert agent.wait() == -signal.SIGKILL
        assert bystander.poll() is None  # its file is outside the watched folder
    finally:
        for p in (agent, bystander):
            if p.poll() is None:
                p.kill()
