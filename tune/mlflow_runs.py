"""The sweep's MLflow runs: one parent run per sweep, each trial's run nested under it and labelled.

`pipeline.run(..., parent_run_id=...)` creates the trial's run (named after the model, e.g. `asac_fgsm`,
with the whole config as params and per-epoch and test metrics). The trial then finds it by its `run_dir`
tag, which lies under the trial's own folder, and adds what the sweep knows: the trial's name as run name,
its axes as `axis.*` params (new keys, so they never collide with the config params), the grids and axes as
tags, and its base model's test metrics as `base_*`. A trial that failed before the pipeline created a run
gets a FAILED run of its own, so every trial shows up under the parent with its error.

Each process opens its own client on the same store; the driver creates the experiment (and so, for a
sqlite store, the database) before any trial starts, so trials never race to create either.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.tracking import MlflowClient

from distributed_asac.errors import UserError
from distributed_asac.metrics import HEADLINE
from distributed_asac.tracking import provenance

PARENT_TAG = "mlflow.parentRunId"
_MAX_TAG = 5000  # MLflow rejects longer tag values


def experiment_id(uri: str, name: str) -> str:
    """The experiment `name`, created with an explicit artifact location (MLflow 3.17 file-store trap, README "Outputs and MLflow") if new."""
    import mlflow

    from distributed_asac.tracking import experiment_id

    mlflow.set_tracking_uri(uri)
    return experiment_id(mlflow, name, uri)


def start_parent(uri: str, experiment: str, name: str, tags: dict[str, str], params: dict[str, Any]) -> str:
    client = MlflowClient(uri)
    run = client.create_run(experiment_id(uri, experiment), run_name=name, tags={**provenance(), **tags})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run.info.run_id


def reopen_parent(uri: str, run_id: str) -> None:
    MlflowClient(uri).update_run(run_id, status="RUNNING")


def finish_parent(uri: str, run_id: str, status: str, metrics: dict[str, float]) -> None:
    client = MlflowClient(uri)
    client.log_batch(run_id, metrics=[Metric(k, float(v), _now(), 0) for k, v in metrics.items()])
    client.set_terminated(run_id, status=status)


def log_report(uri: str, run_id: str, report_dir: Path) -> None:
    """Upload the report folder to the parent run (under `report/`, replacing an earlier upload)."""
    MlflowClient(uri).log_artifacts(run_id, str(report_dir), "report")


def child_runs(uri: str, parent_id: str) -> list[Run]:
    """Every active run nested under `parent_id` (base and probe builds included), all pages."""
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    runs, token = [], None
    while True:
        page = client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'",
                                  max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def trial_runs(runs: list[Run], folder: str, name: str) -> list[Run]:
    """The runs of one trial: those the pipeline made under its folder, or the one made for its failure."""
    prefix = str(Path(folder)) + "/"
    return [r for r in runs if r.data.tags.get("run_dir", "").startswith(prefix) or r.data.tags.get("sweep.trial") == name]


def label_trial(job: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """Label the trial's runs (creating a FAILED one if the pipeline made none); return their ids."""
    client = MlflowClient(job["tracking_uri"])
    runs = trial_runs(child_runs(job["tracking_uri"], job["parent_run_id"]), job["folder"], job["name"])
    tags = {"mlflow.runName": job["name"], "sweep.trial": job["name"], "sweep.grids": json.dumps(job["grids"]),
            "sweep.axes": json.dumps(job["axes"]), "sweep.model": str(record.get("model"))}
    if record["error"]:
        tags["error"] = record["error"][:_MAX_TAG]
    if not runs:
        run = client.create_run(experiment_id(job["tracking_uri"], job["experiment"]), run_name=job["name"],
                                tags={PARENT_TAG: job["parent_run_id"], **tags})
        client.set_terminated(run.info.run_id, status="FAILED")
        run_ids = [run.info.run_id]
    else:
        run_ids = [r.info.run_id for r in runs]
    base = {f"base_{k}": v for k, v in (record.get("base") or {}).items() if k in HEADLINE and v == v}  # v == v: not NaN
    for run_id in run_ids:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()],
                         params=[Param(f"axis.{k}", v if isinstance(v, str) else json.dumps(v)) for k, v in job["axes"].items()],
                         metrics=[Metric(k, float(v), _now(), 0) for k, v in base.items()])
        error_file = Path(job["folder"]) / "error.txt"
        if record["error"] and error_file.is_file():
            client.log_artifact(run_id, str(error_file))
    return run_ids


def delete_runs(uri: str, run_ids: list[str]) -> None:
    """Soft-delete runs (hidden in the UI, restorable with `mlflow runs restore`): stale runs of trials that
    a resumed sweep runs again, so each trial keeps exactly one run."""
    client = MlflowClient(uri)
    for run_id in run_ids:
        client.delete_run(run_id)


def records_from_mlflow(uri: str, parent_id: str) -> tuple[list[dict[str, Any]], Run]:
    """The trial records of a sweep read back from its parent run's children, and the parent run."""
    try:
        parent = MlflowClient(uri).get_run(parent_id)
    except Exception as err:  # MLflow raises a bare MlflowException for an unknown id
        raise UserError(f"--report: no MLflow run {parent_id!r} in {uri} ({type(err).__name__}); pass a sweep's "
                        "parent run id or its folder") from None
    records = []
    for run in child_runs(uri, parent_id):
        tags, metrics = run.data.tags, run.data.metrics
        if "sweep.trial" not in tags:
            continue  # a base or probe build
        records.append({
            "name": tags["sweep.trial"], "axes": json.loads(tags["sweep.axes"]), "grids": json.loads(tags["sweep.grids"]),
            "status": "finished" if run.info.status == "FINISHED" else "failed", "model": tags.get("sweep.model"),
            "metrics": {k.removeprefix("test_"): v for k, v in metrics.items() if k.startswith("test_")},
            "base": {k.removeprefix("base_"): v for k, v in metrics.items() if k.startswith("base_")} or None,
            "error": tags.get("error"),
        })
    return sorted(records, key=lambda r: r["name"]), parent


def _now() -> int:
    return int(time.time() * 1000)
