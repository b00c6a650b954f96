"""Pause points: inert unless named, matched on their context, and released by a file the test creates."""

import os
import subprocess
import sys
import time
from pathlib import Path

from distributed_asac.failpoints import PAUSE_AT, PAUSE_DIR, RELEASE, failpoint

REPO = Path(__file__).resolve().parents[1]
CHILD = "from distributed_asac.failpoints import failpoint\nfor e in (1, 2, 3):\n    failpoint('x.end', epoch=e)\n    print(e, flush=True)\n"


def test_unnamed_or_unmatched_points_do_not_pause(tmp_path, monkeypatch):
    monkeypatch.setenv(PAUSE_DIR, str(tmp_path))
    monkeypatch.delenv(PAUSE_AT, raising=False)
    failpoint("x.end", epoch=2)
    monkeypatch.setenv(PAUSE_AT, "x.end:epoch=2;y.start")
    failpoint("x.end", epoch=1)  # wrong context
    failpoint("x.other", epoch=2)  # wrong name
    assert list(tmp_path.iterdir()) == []


def test_a_matching_point_announces_itself_and_waits_for_release(tmp_path):
    env = {**os.environ, PAUSE_AT: "x.end:epoch=2", PAUSE_DIR: str(tmp_path), "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "1\n"  # epoch 1 passed the point
    while not list(tmp_path.glob("x.end.*.reached")):  # the child is now held at epoch 2
        assert child.poll() is None
        time.sleep(0.01)  # polls the file the child writes; no timing assumed
    (reached,) = tmp_path.glob("x.end.*.reached")
    assert reached.name == f"x.end.{child.pid}.reached" and "'epoch': '2'" in reached.read_text()
    assert child.poll() is None  # still held: nothing printed after epoch 1
    (tmp_path / RELEASE).touch()
    rest, _ = child.communicate(timeout=600)  # bounds a hang only
    assert child.returncode == 0 and rest == "2\n3\n"


def test_a_paused_process_dies_with_its_parent(tmp_path, process_running):
    """The ranks of a killed launcher are orphaned, not killed: paused, they must not wait forever."""
    parent = ("import subprocess, sys\n"
              f"child = subprocess.Popen([sys.executable, '-c', {CHILD!r}])\n"
              "child.wait()\n")
    env = {**os.environ, PAUSE_AT: "x.end:epoch=1", PAUSE_DIR: str(tmp_path), "PYTHONPATH": str(REPO)}
    launcher = subprocess.Popen([sys.executable, "-c", parent], env=env, stdout=subprocess.DEVNULL)
    while not list(tmp_path.glob("x.end.*.reached")):  # the grandchild is paused
        assert launcher.poll() is None
        time.sleep(0.01)
    (reached,) = tmp_path.glob("x.end.*.reached")
    child_pid = int(reached.name.split(".")[2])
    launcher.kill()
    launcher.wait()
    give_up = time.monotonic() + 600  # bounds a broken failpoint only; the exit comes within one poll
    while process_running(child_pid):
        assert time.monotonic() < give_up, "the orphaned paused process kept waiting"
        time.sleep(0.01)
    assert not (tmp_path / RELEASE).exists()  # it was not released: it left on its own
