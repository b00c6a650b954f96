"""Experiment tracking behind one small interface: MLflow on the main process, nothing elsewhere.

The store defaults to `sqlite:///<cwd>/mlflow.db` with artifacts in `<cwd>/mlartifacts`: MLflow 3.17's file
store (`./mlruns`) raises ("maintenance mode"), and without an explicit artifact location artifact paths
would follow each process's working directory. `MLFLOW_TRACKING_URI` or `tracking.uri` points it at a server.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Optional

from .config import Config


def tracking_uri(cfg: Config) -> str:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def experiment_id(mlflow, name: str, uri: str) -> str:
    """The id of MLflow experiment `name`, created with an explicit artifact location if it is new."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):
        artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name).as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=artifacts)
    except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent run
        return mlflow.get_experiment_by_name(name).experiment_id


class Tracker:
    """One MLflow run: params (the whole config), metrics, artifacts; FAILED status if the body raises.

    Use as a context manager; the tag `mlflow.parentRunId` nests the run under another. On non-main
    processes, or with tracking.enabled false, every call is a no-op. `run_id` reopens an existing run (a
    resumed stage): it is set RUNNING again, and a metric already logged at a step is not logged twice.
    """

    def __init__(self, cfg: Config, run_name: str, active: bool, tags: Optional[dict[str, str]] = None,
                 run_id: Optional[str] = None):
        self.cfg, self.run_name, self.tags = cfg, run_name, dict(tags or {})
        self.active = active and cfg.tracking.enabled
        self.run_id: Optional[str] = run_id if self.active else None
        self._client = None
        self._logged: Optional[dict[str, set[int]]] = None  # reopened run: metric → steps already logged

    def __enter__(self) -> "Tracker":
        if not self.active:
            return self
        import mlflow
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(self.cfg)
        mlflow.set_tracking_uri(uri)
        self._client = MlflowClient(uri)
        if self.run_id is not None:
            try:
                self._client.update_run(self.run_id, status="RUNNING")
            except mlflow.exceptions.MlflowException as err:
                from .errors import UserError

                raise UserError(f"resume: MLflow run {self.run_id} ({self.run_name}) is not in {uri}: resume from the "
                                "working directory of the run, or set tracking.uri to its store") from err
            self._logged = {}
            return self
        experiment = experiment_id(mlflow, self.cfg.experiment, uri)
        tags = {"experiment": self.cfg.experiment, **self.tags}
        run = self._client.create_run(experiment, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        self.log_params(self.cfg.flat())
        return self

    def log_params(self, params: dict[str, Any]) -> None:
        if self.active:
            from mlflow.entities import Param

            self._client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        """Log the finite numbers of `metrics` (NaN rates of empty groups are left out, not logged as NaN)."""
        if self.active:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and math.isfinite(v) and not self._was_logged(k, step or 0)]
            self._client.log_batch(self.run_id, metrics=batch)

    def _was_logged(self, key: str, step: int) -> bool:
        """In a reopened run: whether the attempt before already logged `key` at `step` (then this is a redone
        epoch or evaluation, and the history keeps one point per step)."""
        if self._logged is None:
            return False
        if key not in self._logged:
            self._logged[key] = {m.step for m in self._client.get_metric_history(self.run_id, key)}
        if step in self._logged[key]:
            return True
        self._logged[key].add(step)
        return False

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        if self.active:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.active and self.run_id is not None:
            self._client.set_terminated(self.run_id, status="FAILED" if exc_type else "FINISHED")
