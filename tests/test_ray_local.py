"""A local sweep's Ray: every service listens on the loopback address only (read from the kernel's socket
table, /proc/net/tcp and tcp6, of Ray's processes), a client without the sweep's token cannot join, its
workers run at the driver's priority, and its session folder is private to the user and removed afterwards."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, os, socket, subprocess, sys
from tune.trials import local_ray_environment, ray_session
local_ray_environment()

def descendants(root):
    children = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children.get(pid, [])
    return found

def listening(pids):
    inodes = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    out = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # per-word host order
                out.append(socket.inet_ntop(family, words))
    return out

import stat, tempfile
with ray_session(None):
    import ray  # what the session imported, with the local settings
    assert ray.get(ray.remote(lambda: 42).remote()) == 42  # a worker runs: its sockets exist too
    modes = [stat.S_IMODE(os.stat(os.path.join(tempfile.gettempdir(), name)).st_mode)
             for name in os.listdir(tempfile.gettempdir())]
    addresses = listening(descendants(os.getpid()))
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
    intruder = subprocess.run(
        [sys.executable, "-c", f"import ray; ray.init(address={ray.get_runtime_context().gcs_address!r})"],
        # 2 connection tries, not Ray's 20 (a second apart): the first is refused for the token already
        env={**env, "RAY_AUTH_TOKEN": "not-the-token", "RAY_NUM_REDIS_GET_RETRIES": "2"}, capture_output=True,
        text=True, timeout=600)
    worker_niceness = ray.get(ray.remote(lambda: os.nice(0)).remote())
print(json.dumps({"addresses": addresses, "intruder_rc": intruder.returncode, "modes": modes,
                  "niceness": [os.nice(0), worker_niceness],
                  "left": os.listdir(tempfile.gettempdir()),
                  "intruder_refused": "InvalidAuthToken" in intruder.stderr,
                  "intruder_tail": (intruder.stdout + intruder.stderr).strip().splitlines()[-1:]}))
"""


def test_local_ray_listens_on_loopback_only_needs_the_token_and_cleans_up(request):
    temp = tempfile.mkdtemp(prefix="asr-")  # TMPDIR of the probe; short: Ray's socket paths must stay < 107 bytes
    request.addfinalizer(lambda: shutil.rmtree(temp, ignore_errors=True))
    env = {**os.environ, "TMPDIR": temp, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS",
                "RAY_worker_niceness", "ASAC_RAY_TEMP_DIR"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=900)  # bounds a hang only
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["addresses"]) >= 3, result  # GCS, raylet, workers: the probe sees Ray's sockets
    assert set(result["addresses"]) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, result
    assert result["intruder_rc"] != 0 and result["intruder_refused"], result  # refused for its token
    assert result["modes"] == [0o700], result  # one session folder, private to the user
    assert result["left"] == [], result  # and gone after the session
    assert result["niceness"][1] == result["niceness"][0], result  # trials at the driver's priority, not Ray's 15
