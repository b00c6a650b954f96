"""One trial: the CLI's own `pipeline.run` on the cached base, its MLflow run labelled, its record written.

A job is a plain dict (it crosses process boundaries: Ray, `accelerate launch`):

    name, base_config, overrides    the trial's config is load_config(base_config, overrides + output_dir + base)
    folder                          <sweep>/trials/<name>/: the pipeline's output_dir and trial.json
    parent_run_id, tracking_uri     the sweep's MLflow parent run and store
    resources                       {cpu, gpu, processes}; processes > 1 launches Accelerate inside the trial
    axes, grids                     what the MLflow run and the report show
    base                            the cache entry {checkpoint, results}, or {error} if building it failed

With `processes > 1` the trial runs `python -m accelerate.commands.launch --multi_gpu --num_processes N -m
tune.trial <job.json>` on the GPUs Ray gave it (CPU: gloo, with ACCELERATE_USE_CPU=true); every rank
calls the same `pipeline.run` and rank 0 writes the outcome.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from distributed_asac.config import Config, load_config
from distributed_asac.failpoints import failpoint
from distributed_asac.runtime import close_process_group

from . import mlflow_runs
from .records import read_record, write_record

REPO = Path(__file__).resolve().parents[1]
OUTCOME = "outcome.json"  # what rank 0 of a launched trial hands back to the trial process


class TrialFailed(RuntimeError):
    """Raised to Ray after the failure is recorded, so that Ray shows the trial as errored too."""


def load_trial_config(job: dict[str, Any]) -> Config:
    return load_config(job["base_config"], job["overrides"])


def run_trial(job: dict[str, Any]) -> dict[str, Any]:
    """Run one trial unless its record says it finished; return its final metrics.

    The record is written last: a trial killed before that is unfinished, and `--resume` removes its MLflow
    run and runs it again. A trial that raises gets a FAILED MLflow run with its error, a `failed` record and
    an `error.txt` traceback, and then raises `TrialFailed`.
    """
    folder = Path(job["folder"])
    done = read_record(folder)
    if done is not None and done["status"] == "finished":
        return done["metrics"]  # a resumed sweep never retrains a finished trial
    folder.mkdir(parents=True, exist_ok=True)
    start = time.time()
    record: dict[str, Any] = {"name": job["name"], "axes": job["axes"], "grids": job["grids"],
                              "base": (job.get("base") or {}).get("results", {}).get("base")}
    try:
        outcome = call_pipeline(_with_base(job, folder))
        [(model, metrics)] = outcome["results"].items()  # the one fine-tuned model of the trial
        record.update(status="finished", model=model, metrics=metrics, run_dir=outcome["run_dir"], error=None)
    except Exception as err:  # any error of a trial is its result, and the sweep goes on
        (folder / "error.txt").write_text(traceback.format_exc())
        record.update(status="failed", model=None, metrics={}, run_dir=None, error=f"{type(err).__name__}: {err}")
    record.update(started=start, seconds=round(time.time() - start, 1))
    failpoint("trial.before_record", status=record["status"])
    record["mlflow_run_ids"] = mlflow_runs.label_trial(job, record)
    write_record(folder, record)
    if record["status"] == "failed":
        raise TrialFailed(f"trial {job['name']} failed: {record['error']}")
    return record["metrics"]


def _with_base(job: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The job with the trial's own output folder and its cached base checkpoint added to the overrides."""
    base = job.get("base") or {}  # empty when the trial names its own base_checkpoint
    if "error" in base:
        raise RuntimeError(f"its base model could not be trained: {base['error']}")
    extra = [f"output_dir={json.dumps(str(folder))}"]
    if "checkpoint" in base:
        extra.append(f"base_checkpoint={json.dumps(base['checkpoint'])}")
    return {**job, "overrides": [*job["overrides"], *extra]}


def call_pipeline(job: dict[str, Any]) -> dict[str, Any]:
    """`pipeline.run(load_config(...), variants, parent_run_id)` here, or under `accelerate launch` when the job
    asks for several processes; returns {run_dir, results}."""
    processes = int(job["resources"]["processes"])
    if processes > 1:
        return _launch(job, processes)
    import torch

    from distributed_asac import pipeline

    # One thread per reserved CPU: trials share the machine, and oversubscribed BLAS threads slow all of them.
    torch.set_num_threads(max(1, int(job["resources"]["cpu"])))
    out = pipeline.run(load_trial_config(job), variants=job.get("variants"), parent_run_id=job["parent_run_id"])
    return {"run_dir": str(out.run_dir), "results": {k: v for k, v in out.results.items() if k != "probe"}}


def _launch(job: dict[str, Any], processes: int) -> dict[str, Any]:
    folder = Path(job["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    job_path, outcome_path, log_path = folder / "job.json", folder / OUTCOME, folder / "launch.log"
    outcome_path.unlink(missing_ok=True)
    # Each launched process runs the in-process path with its share of the trial's CPUs.
    share = {"cpu": max(1.0, float(job["resources"]["cpu"]) // processes), "gpu": job["resources"]["gpu"], "processes": 1}
    job_path.write_text(json.dumps({**job, "resources": share}, allow_nan=True))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if float(job["resources"]["gpu"]) == 0:
        env["ACCELERATE_USE_CPU"] = "true"  # else --multi_gpu on CPU starts ranks that never talk (README, "Running stage 3")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
               "-m", "tune.trial", str(job_path)]
    with log_path.open("w") as log:
        code = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code != 0 or not outcome_path.is_file():
        tail = log_path.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"accelerate launch exited with status {code} (log: {log_path}): " + " | ".join(tail))
    return json.loads(outcome_path.read_text())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str]) -> None:
    """Entry of each process of a launched trial: run the job; rank 0 writes the outcome file."""
    from accelerate import PartialState

    from distributed_asac.logs import setup_logging

    setup_logging()
    job = json.loads(Path(argv[0]).read_text())
    outcome = call_pipeline(job)
    if PartialState().is_main_process:
        path = Path(job["folder"]) / OUTCOME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(outcome, allow_nan=True))
        os.replace(tmp, path)
    close_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
