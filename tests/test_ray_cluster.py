"""A sweep on a Ray cluster: a head started on 127.0.0.1 with token authentication stands in for the cluster,
and the sweep attaches through RAY_ADDRESS alone. Every trial must end in MLflow, and no process that the
head started may outlive it (found by ancestry and by a marker in their environment, never by name)."""

import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tune.records import RECORD

REPO = Path(__file__).resolve().parents[1]
MARKER = "ASAC_RAY_CLUSTER_TEST_MARKER"
# The driver pids of the jobs the head at $RAY_ADDRESS has seen (the GCS job table; no dashboard needed).
JOB_PIDS = """
import json, ray
ray.init(logging_level="ERROR")
pids = [job["DriverPid"] for job in ray.state.jobs()]
ray.shutdown()
print(json.dumps(pids))
"""


def _sweep_cli(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "tune" / "sweep.py"), *args]


def test_cluster_sweep_refuses_a_local_sqlite_store(tmp_path):
    """Before Ray, a parent run or a sweep folder: one line naming the store and the fix."""
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # never reached
    proc = subprocess.run(_sweep_cli("--config", "configs/sweeps/smoke.yaml", f"output_dir={tmp_path / 'runs'}",
                                     f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"),
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: a sweep on a Ray cluster cannot record into the local sqlite store "
                           f"sqlite:///{tmp_path / 'mlflow.db'}") and "mlflow server --backend-store-uri" in line
    assert "--shared-store" in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def _ours(root: int, marker: str) -> dict[int, str]:
    """pid → command line of `root`'s descendants and of every process carrying the marker."""
    parents, marked = {}, set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if f"{MARKER}={marker}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                marked.add(int(proc.name))
        except (OSError, IndexError, ValueError):
            continue
    found, grew = {root} | marked, True
    while grew:
        grown = found | {pid for pid, parent in parents.items() if parent in found}
        grew, found = grown != found, grown
    names = {}
    for pid in found:
        try:
            names[pid] = (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
        except OSError:
            continue
    return names


@pytest.mark.slow  # 4-6 minutes: a Ray head, 2 bases and 6 trials on 2 cores
def test_smoke_sweep_on_a_token_authenticated_head_through_ray_address(tmp_path, free_port, process_running,
                                                                        marker_of):
    marker, port = marker_of(tmp_path), free_port()
    token = marker_of(tmp_path / "token")  # any secret will do for a head that listens on 127.0.0.1 only
    ray_tmp = tempfile.mkdtemp(prefix="asc-")  # short: Ray's socket paths must stay below 107 bytes
    env = {**os.environ, MARKER: marker, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for key in ("RAY_ADDRESS", "ASAC_RAY_TEMP_DIR"):
        env.pop(key, None)
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
                             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={ray_tmp}"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    started: dict[int, str] = {}
    try:
        ready = subprocess.run([str(Path(sys.executable).with_name("ray")), "status", f"--address=127.0.0.1:{port}"],
                               env=env, capture_output=True, text=True)
        give_up = time.monotonic() + 300  # bounds a head that never comes up; each try waits on Ray itself
        while ready.returncode != 0:
            assert head.poll() is None, head.stdout.read()[-3000:]
            assert time.monotonic() < give_up, ready.stderr[-2000:]
            ready = subprocess.run([str(Path(sys.executable).with_name("ray")), "status",
                                    f"--address=127.0.0.1:{port}"], env=env, capture_output=True, text=True)
        sweep_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
        proc = subprocess.Popen(_sweep_cli("--config", "configs/sweeps/smoke.yaml", "--shared-store",
                                           f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'runs'}",
                                           f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"),
                                env=sweep_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, stderr = proc.communicate(timeout=1500)
        started = _ours(head.pid, marker)
        assert proc.returncode == 0, stderr[-3000:]
        # The sweep's driver was a job of this head (not a Ray of its own): the head's job table names its pid.
        jobs = subprocess.run([sys.executable, "-c", JOB_PIDS], env=sweep_env, capture_output=True, text=True)
        assert proc.pid in json.loads(jobs.stdout.strip().splitlines()[-1]), jobs.stderr[-2000:]
        (folder,) = (tmp_path / "runs" / "sweeps" / "smoke").iterdir()
        records = [json.loads(p.read_text()) for p in folder.glob(f"trials/*/{RECORD}")]
        assert len(records) == 6 and all(r["status"] == "finished" for r in records), records
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("smoke-sweep")
        runs = client.search_runs([experiment.experiment_id])
        (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        finished = {r.info.run_id for r in children if r.info.status == "FINISHED"}
        for record in records:  # every trial's MLflow runs are children of the sweep's parent, finished
            assert record["mlflow_run_ids"] and set(record["mlflow_run_ids"]) <= finished, record
        assert parent.info.status == "FINISHED"
    finally:
        started.update(_ours(head.pid, marker))
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops what it started, then exits
        head.communicate(timeout=300)
        give_up = time.monotonic() + 120
        while [pid for pid in started if process_running(pid)] and time.monotonic() < give_up:
            time.sleep(0.2)
        left = {pid: cmd for pid, cmd in started.items() if process_running(pid)}
        for pid in left:  # never leave them behind, even when the test fails
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert len(started) >= 3, started  # the head's GCS, raylet and workers were seen
    assert left == {}, left
