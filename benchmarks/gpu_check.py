"""Issue 32's GPU numbers in one call of a lent GPU machine, made so that it cannot fail there on a typo.

Steps, in this order, each a script of this folder in a process of its own under a time budget and an overall
deadline. Each step's numbers are written as soon as it ends, so a step that fails or runs out of time leaves the
earlier ones whole; a rerun can name the steps left (`--steps`).

| step | issue | what | script | needs besides torch, accelerate, safetensors, pyyaml |
|---|---|---|---|---|
| syncs | 2.1 | host waits per minibatch under CUDA's sync debug mode: plain, ASAC (FGSM, PGD, fixed chunks), resample, group_dro, jtt (dfr has no minibatch) | sync_counts.py | |
| step64, step256 | 2.2 | the ASAC minibatch, resnet18 at 128 px, k = 64 / 256: eager, fixed chunks, bf16 autocast, channels-last flipped, each against the step's bound in the same rounds; eager against the H200 of 2026-11-26 | bench_step.py | |
| compiled64, compiled256 | 2.2 | the same with `finetune.compile` (last in 2.2: compilation takes the longest and the least is known of it) | bench_step.py | |
| packing | 2.3 | the smoke sweep at 1, 4 and 8 trials per GPU (fractional `resources.gpu`): trials per hour | bench_layout.py | ray, mlflow |
| paper_regime | 2.4 | stretch: the paper-regime study's trials for seed 0, 8 per GPU: wall time | bench_layout.py | ray, mlflow |

The lent machines have torch, torchvision, accelerate, safetensors and pyyaml but neither ray nor mlflow, and cannot
carry them (ray's wheel alone is ~78 MB, over the 64 MiB a call carries): there `packing` and `paper_regime` are
skipped with a line saying so. Nothing else here imports mlflow, ray, deepspeed or captum.

Before a step starts, its device flags are parsed by its script's own parser, and in the dry run its dry flags too
(so the dry run checks every step's device flags on any machine, the skipped ones included): a wrong flag is one
line, not a crash minutes in. Everything is written under
`--out` (default: $OUT): gpu_check.json (the environment: GPU, driver, torch, CUDA, accelerate, package versions,
commit; then every step's command, status, reason, seconds and its script's own JSON), gpu_check.txt (the same as
the scripts' tables) and gpu_check.log (their whole output): three files, as the device tool brings back at most 8.

`--dry-run`: the same steps, scripts and flags at tiny sizes on any machine (tests/test_gpu_check.py runs it in
the default suite); what needs a GPU, what takes minutes on a CPU and what repeats another step's command there is
skipped with a line saying why.

Usage (from the repository root)::

    bash benchmarks/gpu_check.sh --commit HASH            # on the GPU machine: at most 450 s (--deadline)
    bash benchmarks/gpu_check.sh --dry-run --out out/gpu_check
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
# The GPU machine has this package's requirements but not the package installed: its scripts import it from here.
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from _common import machine  # noqa: E402

FILES = ("gpu_check.json", "gpu_check.txt", "gpu_check.log")
DEADLINE_S = 450  # the whole call: under the device call's 480 s limit, leaving a rerun inside the 15 minutes
LEAST_S = 20  # a step is not started with less than this left of the deadline
# importable module → the distribution whose version the environment records
PACKAGES = {"torch": "torch", "torchvision": "torchvision", "accelerate": "accelerate", "safetensors": "safetensors",
            "yaml": "pyyaml", "numpy": "numpy", "ray": "ray", "mlflow": "mlflow", "deepspeed": "deepspeed",
            "captum": "captum"}
VARIANTS = ["fixed_chunks", "bf16_autocast", "channels_last_flipped"]
# The eager ASAC minibatch on one H200, 2026-11-26 (BENCHMARKS.md, "GPU: one NVIDIA H200", the fifth run:
# resnet18, 128 px, bench_step's main table, 20 rounds): k → (asac ms, plain ms, asac / bound)
H200_2026_11_26 = {64: (58.8, 24.7, 1.42), 256: (89.3, 32.9, 1.64)}
NOT_ON_CPU_COMPILE = ("inductor compiles for minutes on a CPU (220 s, BENCHMARKS.md); tests/test_compiled_step.py "
                      "(slow) checks the compiled step's losses and weights")


def cores() -> int:
    return len(os.sched_getaffinity(0))


def step_flags(k: int, variants: list[str]) -> Callable[[bool], list[str]]:
    """bench_step's flags for the ASAC minibatch at k images with `variants`; the dry run's are the same plus
    --smoke (k = 4, 16 px, one round) on small_cnn at one thread."""

    def flags(dry: bool) -> list[str]:
        return ["--backbones", "small_cnn" if dry else "resnet18", "--image-size", "128", "--batch-size", str(k),
                "--threads", "1" if dry else str(cores()), "--variants", *variants, "--repeats", "10",
                "--variant-repeats", "10", "--profile-steps", "3", *(["--smoke"] if dry else [])]

    return flags


def packing_flags(dry: bool) -> list[str]:
    """bench_layout's packing of the smoke sweep: 12 trials (3 settings × 4 seeds) at 1, 4 and 8 per device; the dry
    run's is its --smoke at 1 and 2 per device, one seed."""
    counts, seeds = (["1", "2"], ["0"]) if dry else (["1", "4", "8"], ["0", "1", "2", "3"])
    return ["--sweep", "configs/sweeps/smoke.yaml", "--per-device", *counts, "--seeds", *seeds,
            "--processes", str(cores()), "--repeats", "1", *(["--smoke"] if dry else [])]


def paper_regime_flags(dry: bool) -> list[str]:
    """The paper-regime study's 7 trials of seed 0, all on one GPU at once (it runs on a GPU only)."""
    return ["--sweep", "configs/sweeps/paper_regime.yaml", "--per-device", "8", "--seeds", "0",
            "--processes", str(cores()), "--repeats", "1"]


@dataclass(frozen=True)
class Step:
    id: str
    issue: str  # its item of issue 32, part 2
    title: str
    script: str  # a script of benchmarks/ with --json and a `build_parser()`
    flags: Callable[[bool], list[str]]  # dry run? → its flags besides --json
    budget_s: float
    needs: tuple[str, ...] = ()  # modules it imports besides those every lent machine has
    not_in_dry_run: Optional[str] = None  # why the dry run skips it
    gpu_only: Optional[str] = None  # why it is skipped without a GPU
    reference: Optional[int] = None  # k of the H200 numbers to compare with


STEPS = [
    Step("syncs", "2.1", "Host waits per minibatch", "sync_counts", lambda dry: [], 90),
    Step("step64", "2.2", "The ASAC minibatch at k = 64 against its bound", "bench_step", step_flags(64, VARIANTS), 80,
         reference=64),
    Step("step256", "2.2", "The ASAC minibatch at k = 256 against its bound", "bench_step", step_flags(256, VARIANTS),
         80, reference=256, not_in_dry_run="at the dry run's size (--smoke: k = 4) it is step64's command again"),
    Step("compiled64", "2.2", "The compiled ASAC minibatch at k = 64", "bench_step", step_flags(64, ["compiled"]), 120,
         not_in_dry_run=NOT_ON_CPU_COMPILE),
    Step("compiled256", "2.2", "The compiled ASAC minibatch at k = 256", "bench_step", step_flags(256, ["compiled"]),
         120, not_in_dry_run=NOT_ON_CPU_COMPILE),
    Step("packing", "2.3", "Trials per GPU: the smoke sweep at 1, 4 and 8 per GPU", "bench_layout", packing_flags, 300,
         needs=("ray", "mlflow")),
    Step("paper_regime", "2.4", "Stretch: the paper-regime study's trials for seed 0, packed", "bench_layout",
         paper_regime_flags, 600, needs=("ray", "mlflow"),
         gpu_only="on a CPU it is the study itself (hours); its CPU wall time is the study's record"),
]


def flag_error(step: Step, flags: list[str]) -> Optional[str]:
    """What the step's script says of `flags` (argparse's message), or None when it takes them."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            importlib.import_module(step.script).build_parser().parse_args(flags)
    except SystemExit:
        return errors.getvalue().strip().splitlines()[-1]
    return None


def run_command(command: list[str], timeout: float, log: Path) -> tuple[Optional[int], str, float]:
    """Run `command` in its own process group with REPO importable, stdout captured and stderr appended to `log`;
    killed with its children (Ray's workers included) after `timeout` seconds. → (exit status, or None when it was
    killed; its stdout so far; seconds)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    with log.open("a") as err, subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err,
                                                text=True, start_new_session=True) as proc:
        try:
            out, _ = proc.communicate(timeout=timeout)
            code: Optional[int] = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
            if not _group_gone(proc.pid, 10):  # a child that outlived its parent and ignores SIGTERM
                os.killpg(proc.pid, signal.SIGKILL)
                _group_gone(proc.pid, 10)
            code = None
    return code, out, time.perf_counter() - start


def _group_gone(pgid: int, seconds: float) -> bool:
    """Wait up to `seconds` for every process of the group `pgid` to exit (a zombie has exited); whether they did.
    The step's stdout closing is not enough: a dying process closes its files before it exits, so a grandchild
    can still run for a moment after its parent's pipe reads EOF, and the next step would share the GPU with it."""
    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up:
        if not any(_in_group(stat, pgid) for stat in Path("/proc").glob("[0-9]*/stat")):
            return True
        time.sleep(0.05)
    return False


def _in_group(stat: Path, pgid: int) -> bool:
    """Whether the process of /proc/<pid>/stat runs in process group `pgid` (fields after "(comm)": state, ppid,
    pgrp)."""
    try:
        state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
    except (OSError, IndexError):  # it exited while we read
        return False
    return state != "Z" and int(pgrp) == pgid


def git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def nvidia_smi() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"not run: {e}"
    return done.stdout.strip() or done.stderr.strip()


def version(module: str, dist: str) -> Optional[str]:
    """The version of the distribution `dist` where `module` can be imported, else None."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:  # importable from a folder without package metadata
        return "importable, version unknown"


def environment(commit: Optional[str]) -> dict[str, Any]:
    """The machine, the GPU and its driver, the versions of everything the steps import (None: not importable
    here) and the commit (from git where a checkout travelled, else as passed with --commit)."""
    head = git("rev-parse", "HEAD")
    if head is not None:
        commit = head + (" with uncommitted changes" if git("status", "--porcelain") else "")
    versions = {module: version(module, dist) for module, dist in PACKAGES.items()}
    return {**machine(), "nvidia_smi": nvidia_smi(), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "packages": versions, "commit": commit or "unknown: no git checkout here and no --commit given"}


def reference_line(step: Step, payload: dict[str, Any], gpu: Optional[str]) -> str:
    """The eager step against the H200's of 2026-11-26, where the card is an H200."""
    if not gpu or "H200" not in gpu:
        return f"no earlier numbers for this card ({gpu or 'no GPU'}): only an H200 was measured, 2026-11-26"
    asac_ms, plain_ms, over_bound = H200_2026_11_26[step.reference]
    r = payload["results"][0]
    return (f"against the H200 of 2026-11-26 (k = {step.reference}: asac {asac_ms} ms, plain {plain_ms} ms, asac / "
            f"bound {over_bound}): asac {1e3 * r['asac_s'] / asac_ms:.2f}×, "
            f"plain {1e3 * r['plain_s'] / plain_ms:.2f}×, "
            f"asac / bound {r['asac_over_bound']:.2f} against {over_bound}")


class Report:
    """gpu_check.json and gpu_check.txt under `out`, rewritten whole after every step."""

    def __init__(self, out: Path, header: dict[str, Any]) -> None:
        self.out, self.header, self.steps, self.texts = out, header, [], []

    def add(self, record: dict[str, Any], text: str) -> None:
        self.steps.append(record)
        self.texts.append(text)
        self.save()

    def save(self) -> None:
        for name, content in (("gpu_check.json", json.dumps({**self.header, "steps": self.steps}, indent=2)),
                              ("gpu_check.txt", "\n\n".join([self.environment_text(), *self.texts]) + "\n")):
            partial = self.out / f".{name}.partial"
            partial.write_text(content)
            partial.replace(self.out / name)  # a reader (or a kill) never meets half a file

    def environment_text(self) -> str:
        env = self.header["environment"]
        missing = [m for m, v in env["packages"].items() if v is None]
        return "\n".join([
            f"# GPU check, {'dry run' if self.header['dry_run'] else 'device run'}, {env['date']}",
            f"command: {self.header['command']}",
            f"commit: {env['commit']}",
            f"GPU: {env['gpu'] or 'none'}; nvidia-smi: {env['nvidia_smi']}",
            f"torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), python {env['python']}; "
            + ", ".join(f"{m} {v}" for m, v in env["packages"].items() if v is not None and m != "torch"),
            f"not importable here: {', '.join(missing) or 'none'}",
            f"CPU: {env['cpu']}, {env['usable_cores']} usable cores, "
            f"load {env['load_average_1m_at_start']:.2f} at start",
        ])


def skip_reason(step: Step, dry: bool, left: float) -> Optional[str]:
    missing = [module for module in step.needs if importlib.util.find_spec(module) is None]
    if dry and step.not_in_dry_run:
        return f"not in the dry run: {step.not_in_dry_run}"
    if step.gpu_only and not torch.cuda.is_available():
        return f"needs a GPU: {step.gpu_only}"
    if missing:
        return (f"needs {', '.join(step.needs)}; not importable here: {', '.join(missing)} (the lent GPU machines have "
                "neither, and ray's wheel alone is over the 64 MiB a device call carries)")
    if left < LEAST_S:
        return f"not started: {max(left, 0.0):.0f} s left of the deadline"
    return None


def run_step(step: Step, dry: bool, left: float, out: Path, scratch: Path,
             gpu: Optional[str]) -> tuple[dict[str, Any], str]:
    """One step: its record for gpu_check.json and its text for gpu_check.txt."""
    flags = step.flags(dry)
    command = [sys.executable, f"benchmarks/{step.script}.py", *flags, "--json", str(scratch / f"{step.id}.json")]
    record: dict[str, Any] = {"id": step.id, "issue": step.issue, "title": step.title, "needs": list(step.needs),
                              "command": command[1:], "budget_s": step.budget_s, "seconds": 0.0, "result": None}
    heading = f"## {step.issue} {step.id}: {step.title}"
    error = flag_error(step, step.flags(False)) or (flag_error(step, flags) if dry else None)
    reason = f"bad flags: {error}" if error else skip_reason(step, dry, left)
    if reason:
        status = "failed" if error else "skipped"
        return {**record, "status": status, "reason": reason}, f"{heading}: {status}, {reason}"
    timeout = min(step.budget_s, left)
    with (out / "gpu_check.log").open("a") as log:
        log.write(f"\n== {step.id}: {' '.join(command[1:])}\n")
    code, stdout, seconds = run_command(command, timeout, out / "gpu_check.log")
    with (out / "gpu_check.log").open("a") as log:
        log.write(stdout)
    record["seconds"] = seconds
    if code is None:
        limit = "its budget" if timeout == step.budget_s else "the deadline"
        status, reason = "stopped", f"killed at {timeout:.0f} s ({limit})"
    elif code != 0:
        status, reason = "failed", f"exit status {code}: see gpu_check.log"
    else:
        status, reason = "done", ""
        record["result"] = json.loads((scratch / f"{step.id}.json").read_text())
    lines = [f"{heading}: {status} in {seconds:.0f} s{', ' + reason if reason else ''}",
             f"$ python {' '.join(command[1:-2])}", stdout.rstrip()]
    if status == "done" and step.reference:
        lines.append(reference_line(step, record["result"], gpu))
    return {**record, "status": status, "reason": reason}, "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes on any machine: the same scripts and flags, GPU-only and slow steps skipped")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "out/gpu_check"),
                        help="where the three files go (default: $OUT, else out/gpu_check)")
    parser.add_argument("--deadline", type=float, default=DEADLINE_S,
                        help=f"seconds for the whole run (default {DEADLINE_S}); no step starts with under "
                             f"{LEAST_S} left")
    parser.add_argument("--steps", nargs="+", choices=[s.id for s in STEPS], default=[s.id for s in STEPS],
                        help="these steps only, still in the table's order (a rerun of what the last call left)")
    parser.add_argument("--commit", help="the commit of the tree, where it travelled without .git")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    begun = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        (args.out / name).unlink(missing_ok=True)
    env = environment(args.commit)
    command = " ".join(["benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])])
    report = Report(args.out, {"benchmark": "gpu_check", "dry_run": args.dry_run, "deadline_s": args.deadline,
                               "command": command, "environment": env})
    report.save()
    print(report.environment_text(), flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:  # the scripts' JSON, before it joins the report
        for step in (s for s in STEPS if s.id in args.steps):
            record, text = run_step(step, args.dry_run, args.deadline - (time.monotonic() - begun), args.out,
                                    Path(scratch), env["gpu"])
            report.add(record, text)
            print(f"{step.issue} {step.id}: {record['status']}" + (f", {record['reason']}" if record["reason"] else "")
                  + (f" ({record['seconds']:.0f} s)" if record["seconds"] else ""), flush=True)
    print(f"tables: {args.out / 'gpu_check.txt'}; everything: {args.out / 'gpu_check.json'}")
    return 1 if any(s["status"] in ("failed", "stopped") for s in report.steps) else 0


if __name__ == "__main__":
    sys.exit(main())
