"""What a sweep keeps: the typed record of each trial, the sweep folder (the source of truth for `--resume` and
`--report <sweep dir>`) and the sweep's MLflow runs.

    <output_dir>/sweeps/<name>/<timestamp>/
        sweep.json              the expanded trials, resources, MLflow store, experiment and parent run id
        trials/<trial>/         the trial's pipeline run folder, trial.json (its record) and error.txt if it failed
        ray/                    Ray Tune's own experiment folders (one per attempt)
        report/                 report.md, one CSV per grid, trials.csv, pareto.png

Ray Tune snapshots its experiment state only every few seconds, so a trial that finished just before the
driver was killed could be run again by `Tuner.restore`; a trial's record, written atomically as its last
act, cannot be lost that way.

MLflow: one parent run per sweep, each trial's run nested under it. `pipeline.run(..., parent_run_id=...)`
creates the trial's run (named after the model, e.g. `asac_fgsm`, with the whole config as params and per-epoch
and test metrics); `label_trial` then finds it by its `run_dir` tag, which lies under the trial's own folder,
and adds what the sweep knows: the trial's name as run name, its axes as `axis.*` params (new keys, so they
never collide with the config params), the grids and axes as tags, and its base model's test metrics as
`base_*`. A trial that failed before the pipeline created a run gets a FAILED run of its own, so every trial
shows up under the parent with its error. Each process opens its own client on the same store; the driver
creates the experiment (and so, for a sqlite store, the database) before any trial starts, so trials never
race to create either.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.tracking import MlflowClient

from distributed_asac.errors import UserError
from distributed_asac.files import atomic_write
from distributed_asac.metrics import HEADLINE
from distributed_asac.tracking import NOTE_TAG, log_table, note, provenance

if TYPE_CHECKING:
    from .trials import TrialJob

STATE = "sweep.json"
RECORD = "trial.json"
TRIALS = "trials"
STATUSES = ("finished", "stopped", "failed", "pending")
PARENT_TAG = "mlflow.parentRunId"
_MAX_TAG = 5000  # MLflow rejects longer tag values


@dataclass
class TrialRecord:
    """The outcome of one trial (its trial.json): what the report, `--resume` and the MLflow labels read."""

    name: str  # t<index>-<axes>
    axes: dict[str, Any]  # axis → value, seed last
    grids: list[str]  # the grids the trial belongs to
    status: str  # finished | stopped (by ASHA, early) | failed | pending (never ran, or was killed before its record)
    metrics: dict[str, Any] = field(default_factory=dict)  # its fine-tuned model's test report
    base: Optional[dict[str, Any]] = None  # the test report of the base model it started from
    error: Optional[str] = None  # "<exception type>: <message>" of a failed trial
    model: Optional[str] = None  # the row name of its fine-tuned model (rows.py)
    run_dir: Optional[str] = None  # the pipeline's run folder
    started: Optional[float] = None  # seconds since the epoch
    seconds: Optional[float] = None  # how long it ran
    mlflow_run_ids: list[str] = field(default_factory=list)  # its runs under the sweep's parent
    stopped_epoch: Optional[int] = None  # a stopped trial: the last fine-tuning epoch it finished

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialRecord:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=2, allow_nan=True))


def read_record(folder: Path) -> Optional[TrialRecord]:
    path = folder / RECORD
    return TrialRecord.from_dict(json.loads(path.read_text())) if path.is_file() else None


def write_record(folder: Path, record: TrialRecord) -> None:
    write_json(folder / RECORD, asdict(record))


def trial_folder(sweep_dir: Path, name: str) -> Path:
    return sweep_dir / TRIALS / name


def new_sweep_dir(output_dir: Path, name: str) -> Path:
    """A fresh `<output_dir>/sweeps/<name>/<timestamp>` (suffixed if two sweeps start within one second)."""
    base = output_dir / "sweeps" / name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, suffix = base / stamp, 1
    while folder.exists():
        suffix += 1
        folder = base / f"{stamp}-{suffix}"
    folder.mkdir(parents=True)
    return folder


def latest_sweep_dir(output_dir: Path, name: str, runs_these: Callable[[dict[str, Any]], bool]) -> Path:
    """The most recent sweep folder of `name` whose sweep.json `runs_these` accepts (what `--resume` continues):
    a sweep of the same file run with other `--grids`, `--seeds` or overrides since is passed over, as is a
    folder whose sweep.json cannot be read (a damaged folder never hides the rest)."""
    root = output_dir / "sweeps" / name
    folders = sorted((p for p in root.glob("*") if (p / STATE).is_file()), key=lambda p: (p / STATE).stat().st_mtime)
    if not folders:
        raise UserError(f"--resume: no earlier sweep {name!r} under {root} to resume; run without --resume to start one")
    for folder in reversed(folders):
        try:
            state = json.loads((folder / STATE).read_text())
        except (OSError, ValueError):
            continue
        if runs_these(state):
            return folder
    raise UserError(f"--resume: no sweep {name!r} under {root} runs these trials (they ran other --grids, --seeds "
                    "or overrides); give the options of the sweep to resume, or --resume <its folder>")


def read_state(sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / STATE
    if not path.is_file():
        raise UserError(f"{sweep_dir} is not a sweep folder (no {STATE}); pass the folder a sweep printed")
    return json.loads(path.read_text())


def load_records(sweep_dir: Path) -> list[TrialRecord]:
    """One record per trial of the sweep, in grid order; trials that never finished are `pending`."""
    return [read_record(trial_folder(sweep_dir, trial["name"]))
            or TrialRecord(trial["name"], trial["axes"], trial["grids"], "pending")
            for trial in read_state(sweep_dir)["trials"]]


def status_counts(records: list[TrialRecord]) -> dict[str, int]:
    return {status: sum(r.status == status for r in records) for status in STATUSES}


# ---- the sweep's MLflow runs ----

def experiment_id(uri: str, name: str) -> str:
    """The experiment `name`, created with an explicit artifact location (see tracking.experiment_id) if new."""
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


def finish_parent(uri: str, run_id: str, status: str, records: list[TrialRecord]) -> None:
    """End the parent run as `status` with the trial counts (`trials_finished`, ...) as its metrics. A parent that
    ends KILLED ends its children still RUNNING as KILLED too: the trials' processes were stopped with the
    driver, and a killed process cannot end its own run."""
    client = MlflowClient(uri)
    counts = status_counts(records)
    client.log_batch(run_id, metrics=[Metric(f"trials_{s}", float(n), _now(), 0) for s, n in counts.items()])
    if status == "KILLED":
        for child in child_runs(uri, run_id):
            if child.info.status == "RUNNING":
                client.set_terminated(child.info.run_id, status="KILLED")
    client.set_terminated(run_id, status=status)


def holds_run(uri: str, run_id: str) -> bool:
    """Whether the store at `uri` holds run `run_id`, without creating anything (a missing sqlite file stays missing)."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return False
    try:
        MlflowClient(uri).get_run(run_id)
    except Exception:  # noqa: BLE001 - MLflow raises its own exceptions for an unknown id or an unreachable store
        return False
    return True


def log_report(uri: str, run_id: str, report_dir: Path, summary: str) -> None:
    """Upload the report folder to the parent run (under `report/`, replacing an earlier upload), its tables
    (each CSV: claims, grids, trials) also as sortable MLflow tables under `tables/`, and `summary` (markdown)
    as the run's description, which the UI shows first."""
    import pandas as pd

    client = MlflowClient(uri)
    client.log_artifacts(run_id, str(report_dir), "report")
    for path in sorted(report_dir.glob("*.csv")):
        log_table(client, run_id, pd.read_csv(path).to_dict("records"), f"tables/{path.stem}.json")
    client.set_tag(run_id, NOTE_TAG, note(summary, "the artifact report/report.md"))


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


def label_trial(job: TrialJob, record: TrialRecord) -> list[str]:
    """Label the trial's runs (creating a FAILED one if the pipeline made none); return their ids."""
    client = MlflowClient(job.tracking_uri)
    runs = trial_runs(child_runs(job.tracking_uri, job.parent_run_id), job.folder, job.name)
    tags = {"mlflow.runName": job.name, "sweep.trial": job.name, "sweep.grids": json.dumps(job.grids),
            "sweep.axes": json.dumps(job.axes), "sweep.model": str(record.model)}
    if record.error:
        tags["error"] = record.error[:_MAX_TAG]
    if not runs:
        run = client.create_run(experiment_id(job.tracking_uri, job.experiment), run_name=job.name,
                                tags={**provenance(), PARENT_TAG: job.parent_run_id, **tags})
        client.set_terminated(run.info.run_id, status="FAILED")
        run_ids = [run.info.run_id]
    else:
        run_ids = [r.info.run_id for r in runs]
    base = {f"base_{k}": v for k, v in (record.base or {}).items() if k in HEADLINE and v == v}  # v == v: not NaN
    for run_id in run_ids:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()],
                         params=[Param(f"axis.{k}", v if isinstance(v, str) else json.dumps(v)) for k, v in job.axes.items()],
                         metrics=[Metric(k, float(v), _now(), 0) for k, v in base.items()])
        error_file = Path(job.folder) / "error.txt"
        if record.error and error_file.is_file():
            client.log_artifact(run_id, str(error_file))
    return run_ids


def record_stopped(job: TrialJob, epoch: int, last: dict[str, Any], seconds: Optional[float]) -> TrialRecord:
    """Record a trial that ASHA stopped after fine-tuning epoch `epoch` (its process was ended by Tune, so it could
    not record itself): a `stopped` record holding the validation metrics it last reported, and its MLflow runs
    KILLED with the epoch as a tag, labelled as every trial's are; `seconds` is what it ran (Ray Tune's count). Never
    `failed`: nothing went wrong."""
    record = TrialRecord(job.name, job.axes, job.grids, "stopped", metrics={f"last_{k}": v for k, v in last.items()},
                         base=(job.base or {}).get("results", {}).get("base"), stopped_epoch=epoch, seconds=seconds,
                         started=None if seconds is None else time.time() - seconds)
    record.mlflow_run_ids = label_trial(job, record)
    client = MlflowClient(job.tracking_uri)
    for run_id in record.mlflow_run_ids:
        client.set_tag(run_id, "sweep.stopped_at_epoch", str(epoch))
        if client.get_run(run_id).info.status != "FINISHED":  # RUNNING, or FAILED by Tune's SystemExit in the trial
            client.set_terminated(run_id, status="KILLED")
    write_record(Path(job.folder), record)
    return record


def delete_runs(uri: str, run_ids: list[str]) -> None:
    """Soft-delete runs (hidden in the UI, restorable with `mlflow runs restore`): stale runs of trials that
    a resumed sweep runs again, so each trial keeps exactly one run."""
    client = MlflowClient(uri)
    for run_id in run_ids:
        client.delete_run(run_id)


def records_from_mlflow(uri: str, parent_id: str) -> tuple[list[TrialRecord], Run]:
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
        records.append(TrialRecord(
            name=tags["sweep.trial"], axes=json.loads(tags["sweep.axes"]), grids=json.loads(tags["sweep.grids"]),
            status="finished" if run.info.status == "FINISHED" else "failed", model=tags.get("sweep.model"),
            metrics={k.removeprefix("test_"): v for k, v in metrics.items() if k.startswith("test_")},
            base={k.removeprefix("base_"): v for k, v in metrics.items() if k.startswith("base_")} or None,
            error=tags.get("error"),
        ))
    return sorted(records, key=lambda r: r.name), parent


def _now() -> int:
    return int(time.time() * 1000)
