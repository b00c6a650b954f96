"""benchmarks/gpu_check.sh, the one command of a lent GPU machine, runs end to end here in its dry mode, in a Python
where the requirements those machines lack cannot be imported (as there), and writes the three files the device run
would: so a wrong flag, a missing import or a typo fails here, not in the device's 15 minutes. Nothing is timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Requirements of this project that the lent GPU machines do not have (the device tool's package list).
ABSENT_THERE = ("mlflow", "ray", "deepspeed", "captum", "fairlearn", "torchattacks")


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_check

    return gpu_check


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The dry run as a user starts it (the shell line, from another folder, OUT set), every process of it
    started with ABSENT_THERE unimportable: a sitecustomize sets their sys.modules entries to None."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    (tmp / "absent").mkdir()
    (tmp / "absent" / "sitecustomize.py").write_text(
        f"import sys\n\nsys.modules.update(dict.fromkeys({ABSENT_THERE!r}))\n")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(tmp / "absent"), "OUT": str(tmp / "out")}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=600)
    return done, tmp / "out"


def test_the_dry_run_writes_the_environment_and_every_step_in_order(dry_run, gpu_check):
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.FILES)  # the device tool brings back 8 at most
    report = json.loads((out / "gpu_check.json").read_text())
    env = report["environment"]
    assert report["dry_run"] and env["gpu"] is None and env["commit"]
    assert all(env["packages"][name] for name in ("torch", "accelerate", "safetensors", "yaml"))
    assert [s["id"] for s in report["steps"]] == [s.id for s in gpu_check.STEPS]
    assert {s["id"]: s["status"] for s in report["steps"]} == {
        "syncs": "done", "step64": "done", "step256": "skipped", "compiled64": "skipped", "compiled256": "skipped",
        "packing": "skipped", "paper_regime": "skipped"}
    text = (out / "gpu_check.txt").read_text()
    assert all(f"## {s.issue} {s.id}: {s.title}" in text for s in gpu_check.STEPS)
    assert "not importable here: ray, mlflow, deepspeed, captum" in text


def test_the_dry_run_ran_without_the_packages_the_gpu_machines_lack(dry_run):
    """The blocked imports took: the environment saw them missing, and the sync counts and the step, which must run
    there, ran; the steps that need ray and mlflow say so."""
    report = json.loads((dry_run[1] / "gpu_check.json").read_text())
    assert [name for name, version in report["environment"]["packages"].items() if version is None] == [
        "ray", "mlflow", "deepspeed", "captum"]
    steps = {s["id"]: s for s in report["steps"]}
    assert steps["packing"]["needs"] == ["ray", "mlflow"]
    assert "needs ray, mlflow; not importable here: ray, mlflow" in steps["packing"]["reason"]


def test_skipped_steps_say_why(dry_run):
    steps = {s["id"]: s for s in json.loads((dry_run[1] / "gpu_check.json").read_text())["steps"]}
    assert "step64's command again" in steps["step256"]["reason"]
    assert all("inductor compiles for minutes on a CPU" in steps[s]["reason"] for s in ("compiled64", "compiled256"))
    assert steps["paper_regime"]["reason"].startswith("needs a GPU")
    assert all(s["result"] is None for s in steps.values() if s["status"] == "skipped")


def test_the_dry_run_counts_host_reads_and_times_the_step_against_its_bound(dry_run):
    steps = {s["id"]: s for s in json.loads((dry_run[1] / "gpu_check.json").read_text())["steps"]}
    rows = steps["syncs"]["result"]["results"]["rows"]
    reads = {(r["row"], *r["settings"]): r.get("host_reads") for r in rows}
    assert reads[("plain",)] == [] and reads[("asac_fgsm",)] == ["tolist"]
    assert reads[("asac_fgsm", "fixed_chunks")] == []
    assert {r["row"] for r in rows} >= {"asac_pgd", "resample", "group_dro", "jtt", "dfr"}
    assert all(r["cuda_syncs"] is None for r in rows if "skipped" not in r)  # no GPU: not counted, and it says so
    (step,) = steps["step64"]["result"]["results"]
    assert step["asac_over_bound"] > 0 and set(step["variants"]) == {"default", "fixed_chunks", "bf16_autocast",
                                                                      "channels_last_flipped"}
    assert all(v["over_bound"] > 0 for v in step["variants"].values())


def test_every_steps_device_flags_are_checked_before_it_runs(gpu_check):
    """A flag that a step's script does not take is its one line, and the step does not run."""
    typo = gpu_check.Step("packing", "2.3", "packing", "bench_layout", lambda dry: ["--per-devce", "1"], 1.0)
    assert "unrecognized arguments: --per-devce" in gpu_check.flag_error(typo, typo.flags(False))
    assert all(gpu_check.flag_error(step, step.flags(False)) is None for step in gpu_check.STEPS)


def test_a_step_past_its_budget_is_killed_with_its_children(gpu_check, tmp_path, process_running):
    sleeper = "[sys.executable, '-c', 'import time; time.sleep(60)']"
    child = f"import subprocess, sys, time; print(subprocess.Popen({sleeper}).pid, flush=True); time.sleep(60)"
    code, out, seconds = gpu_check.run_command([sys.executable, "-c", child], 2, tmp_path / "log")
    assert code is None and seconds < 30
    assert not process_running(int(out))


def test_no_step_starts_past_the_deadline_and_the_files_are_still_written(gpu_check, tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--deadline", "0", "--steps", "syncs"]) == 0
    (step,) = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert step["status"] == "skipped" and step["reason"] == "not started: 0 s left of the deadline"
    assert "## 2.1 syncs" in (tmp_path / "gpu_check.txt").read_text()
