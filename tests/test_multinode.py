"""Two "nodes" on this machine: launch/multinode.sh started twice (NODE_RANK 0 and 1, one CPU process each,
MAIN_ADDR=127.0.0.1), for DDP and DeepSpeed ZeRO-2, and the shared-folder preflight; launch/slurm.sbatch and
the launcher's arguments checked with stand-ins for srun, scontrol and accelerate (no SLURM here)."""

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MULTINODE = REPO / "launch" / "multinode.sh"
SMOKE = ["--config", str(REPO / "configs" / "smoke.yaml"), "data.synthetic_num_images=160", "base.epochs=1",
         "probe.epochs=1", "finetune.epochs=1", "analysis.robustness_images=0", "analysis.ig_images=0"]


def _two_nodes(backend: str, port: int, cwds: list[Path], args: list[str]) -> list[subprocess.CompletedProcess]:
    """launch/multinode.sh on node ranks 0 and 1 at once, each in its own working directory."""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(NUM_NODES="2", GPUS_PER_NODE="1", MAIN_ADDR="127.0.0.1", MAIN_PORT=str(port), BACKEND=backend,
               DEVICE="cpu", OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    nodes = [subprocess.Popen([str(MULTINODE), *args], cwd=cwd, env={**env, "NODE_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for rank, cwd in enumerate(cwds)]
    done = []
    try:
        for node in nodes:
            out, err = node.communicate(timeout=540)
            done.append(subprocess.CompletedProcess(node.args, node.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail("a node did not finish (a hung rendezvous or collective?)")
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.communicate()
    return done


def _check_replicas(tmp: Path, experiment: str, distributed_type: str, zero_stage) -> None:
    (run_dir,) = (tmp / "runs" / experiment).iterdir()
    for model in ("base", "asac_fgsm"):
        replicas = json.loads((run_dir / model / "replicas.json").read_text())
        assert replicas["world_size"] == 2 and replicas["distributed_type"] == distributed_type, replicas
        assert replicas["zero_stage"] == zero_stage
        digests = replicas["parameter_digests"]
        assert len(digests) == 2 and len(set(digests)) == 1, replicas
    assert not (tmp / ".deepspeed_env").exists() and not (REPO / ".deepspeed_env").exists()


def _folders(tmp: Path) -> list[str]:
    return [f"data.root={tmp / 'data'}", f"output_dir={tmp / 'runs'}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}"]


@pytest.mark.slow  # ~1 minute quiet (4 processes start); test_distributed.py has 2-process DDP in the default run
def test_ddp_on_two_nodes(tmp_path, free_port):
    """All three stages on 2 nodes × 1 process: world size 2, the same parameters on both ranks."""
    procs = _two_nodes("ddp", free_port(), [tmp_path, tmp_path], [*SMOKE, *_folders(tmp_path), "experiment=ddp"])
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    _check_replicas(tmp_path, "ddp", "MULTI_CPU", None)


@pytest.mark.slow  # ~1 minute (DeepSpeed's first run compiles an op); the DDP test above is in the default run
def test_deepspeed_zero2_on_two_nodes(tmp_path, free_port):
    """DeepSpeed through the standard (torchrun) launcher on each node: not pdsh, no .deepspeed_env."""
    procs = _two_nodes("zero2", free_port(), [tmp_path, tmp_path], [*SMOKE, *_folders(tmp_path), "experiment=zero2"])
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    _check_replicas(tmp_path, "zero2", "DEEPSPEED", 2)


def test_node_local_output_dir_is_refused(tmp_path, free_port):
    """A relative output_dir from two working directories is two folders, as node-local disks would be: every
    rank stops before any data or training with one line naming the key, the folder and the fix."""
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for cwd in cwds:
        cwd.mkdir()
    args = [*SMOKE, f"data.root={tmp_path / 'data'}", "output_dir=local_runs",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "experiment=local"]
    procs = _two_nodes("ddp", free_port(), cwds, args)
    expected = (f"error: config key 'output_dir': 'local_runs' ({cwds[0] / 'local_runs'} on rank 0) is not the same "
                "folder on every node: rank(s) [1] on ")
    for proc in procs:
        assert proc.returncode != 0
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(expected), proc.stderr[-3000:]
        assert "mounts at the same path" in errors[0]
    assert not (tmp_path / "data").exists()  # stopped before the data
    assert list((cwds[0] / "local_runs").iterdir()) == []  # the token is gone, no run folder


def _stand_in(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def stand_ins(tmp_path):
    """srun (runs its command once per node, as node 0 and 1), scontrol (two host names) and accelerate (records
    its arguments and ACCELERATE_USE_CPU per node rank) on PATH, in place of SLURM and the real launcher."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    _stand_in(bin_dir, "srun", f'printf "%s\\n" "$@" > {log}/srun\nwhile [[ $1 == --* ]]; do shift; done\n'
                               'for node in 0 1; do SLURM_NODEID=$node "$@" || exit $?; done\n')
    _stand_in(bin_dir, "scontrol", '[ "$*" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n')
    _stand_in(bin_dir, "accelerate", f'printf "%s\\n" "$@" > {log}/accelerate.$NODE_RANK\n'
                                     f'echo "${{ACCELERATE_USE_CPU:-unset}}" > {log}/use_cpu.$NODE_RANK\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("ACCELERATE_USE_CPU", None)
    return env, log


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_slurm_script_starts_one_launcher_per_node(stand_ins, tmp_path):
    env, log = stand_ins
    assert subprocess.run(["bash", "-n", str(REPO / "launch" / "slurm.sbatch")]).returncode == 0
    env.update(SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_NUM_NODES="2",
               SLURM_GPUS_ON_NODE="8", BACKEND="zero2")
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "--config", "configs/x.yaml",
                           "output_dir=/shared/runs"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    srun = (log / "srun").read_text().splitlines()
    assert srun[:3] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    for rank in (0, 1):
        args = (log / f"accelerate.{rank}").read_text().splitlines()
        assert _flag(args, "--machine_rank") == str(rank) and _flag(args, "--num_machines") == "2"
        assert _flag(args, "--num_processes") == "16" and _flag(args, "--main_process_ip") == "gpu07"
        assert _flag(args, "--main_process_port") == "29500"
        assert _flag(args, "--deepspeed_multinode_launcher") == "standard" and "--multi_gpu" not in args
        assert _flag(args, "--deepspeed_config_file") == str(REPO / "launch" / "deepspeed_zero2.json")
        assert args[-5:] == ["-m", "distributed_asac.finetune", "--config", "configs/x.yaml", "output_dir=/shared/runs"]


@pytest.mark.parametrize("backend,device", [("ddp", "gpu"), ("ddp", "cpu"), ("zero3", "cpu")])
def test_multinode_arguments(stand_ins, backend, device):
    env, log = stand_ins
    env.update(NUM_NODES="2", GPUS_PER_NODE="8", NODE_RANK="1", MAIN_ADDR="10.0.0.1", BACKEND=backend, DEVICE=device)
    if backend != "ddp":
        env["ACCELERATE_USE_CPU"] = "true"  # set by mistake: a DeepSpeed launch must drop it
    proc = subprocess.run([str(MULTINODE), "--config", "c.yaml"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    args = (log / "accelerate.1").read_text().splitlines()
    use_cpu = (log / "use_cpu.1").read_text().strip()
    assert _flag(args, "--machine_rank") == "1" and _flag(args, "--rdzv_backend") == "static"
    if backend == "ddp":
        assert "--multi_gpu" in args and "--use_deepspeed" not in args
        assert use_cpu == ("true" if device == "cpu" else "unset")
    else:
        assert "--use_deepspeed" in args and "--multi_gpu" not in args
        assert _flag(args, "--deepspeed_multinode_launcher") == "standard" and use_cpu == "unset"


def test_multinode_refuses_an_unknown_backend(stand_ins):
    env, _ = stand_ins
    env.update(NUM_NODES="2", GPUS_PER_NODE="8", NODE_RANK="0", MAIN_ADDR="10.0.0.1", BACKEND="fsdp")
    proc = subprocess.run([str(MULTINODE)], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == "error: BACKEND=fsdp is not one of ddp, zero2, zero3; set BACKEND=ddp (or zero2, zero3)\n"
