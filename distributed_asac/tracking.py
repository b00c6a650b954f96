"""Experiment tracking behind one small interface: MLflow on the main process, nothing elsewhere.

The store defaults to `sqlite:///<cwd>/mlflow.db` with artifacts in `<cwd>/mlartifacts`: MLflow 3.17's file
store (`./mlruns`) raises ("maintenance mode"), and without an explicit artifact location artifact paths
would follow each process's working directory. `MLFLOW_TRACKING_URI` or `tracking.uri` points it at a server.
"""

from __future__ import annotations

import functools
import getpass
import logging
import math
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from .config import Config
from .errors import UserError


def tracking_uri(cfg: Config) -> str:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


PROBE_TIMEOUT_S = 5


def check_store(cfg: Config) -> None:
    """`probe_store` for the tracking URI of `cfg` (nothing when tracking is off)."""
    if cfg.tracking.enabled:
        where = "tracking.uri" if cfg.tracking.uri else (
            "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the default tracking.uri")
        probe_store(tracking_uri(cfg), where)


def probe_store(uri: str, where: str) -> None:
    """Open the tracking store once, before any data or training, and turn whatever stops it into one line:
    an unreachable server within PROBE_TIMEOUT_S (the MLflow client would retry for minutes), an unknown URI
    scheme, a file that is no database. `where` says where the URI came from. Nothing is written to a server."""
    from urllib.parse import urlparse

    fix = "fix it, set tracking.uri=sqlite:///<folder>/mlflow.db, or tracking.enabled=false"
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname or "localhost", port), timeout=PROBE_TIMEOUT_S).close()
        except OSError as err:
            reason = err.strerror or type(err).__name__
            raise UserError(f"MLflow tracking server {uri} ({where}) is unreachable: {reason}; start the server or "
                            f"{fix}") from None
    from mlflow.tracking import MlflowClient

    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_TIMEOUT_S)})
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - a probe: any failure here is the store's, named in one line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise UserError(f"MLflow tracking store {uri} ({where}) cannot be used: {reason}; {fix}") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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


@functools.lru_cache(maxsize=None)
def _git_state() -> tuple[str, str]:
    """(commit, dirty) of the git checkout this package runs from, or ("unknown", "unknown") when it is not
    one (an installed package: a checkout that merely contains the environment does not count)."""
    here = Path(__file__).resolve()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(here.parent), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        git("ls-files", "--error-unmatch", here.name)  # this file is tracked: the code is the checkout's
        return git("rev-parse", "HEAD"), str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower()
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"


def provenance() -> dict[str, str]:
    """Tags that say where a run came from: code version, who, what command, where, how many processes."""
    commit, dirty = _git_state()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no $USER (some containers)
        user = "unknown"
    return {"git_commit": commit, "git_dirty": dirty, "mlflow.source.git.commit": commit, "user": user,
            "mlflow.user": user, "command": shlex.join([sys.executable, *sys.argv])[:5000], "host": socket.gethostname(),
            "world_size": os.environ.get("WORLD_SIZE", "1")}  # set by every launcher (accelerate, torchrun)


def close_killed_runs(cfg: Config, marker: str) -> list[str]:
    """Mark KILLED the MLflow runs still RUNNING whose run folder (<output_dir>/<experiment>/*, or a comparison's
    seed_<s> folder in it) keeps its `marker` and whose process, on this host, is gone: a killed run cannot mark
    itself. Returns their run ids.
    Runs of other hosts, of live processes or without a readable marker are left alone; a failure here is a
    warning, never a reason to stop the new run."""
    if not cfg.tracking.enabled:
        return []
    import re

    dead = set()
    runs_dir = Path(cfg.output_dir) / cfg.experiment
    for path in [*runs_dir.glob(f"*/{marker}"), *runs_dir.glob(f"*/seed_*/{marker}")]:  # runs; a comparison's seeds
        found = re.search(r"pid (\d+) on (\S+);", path.read_text(errors="replace"))
        if found and found.group(2) == socket.gethostname() and not _alive(int(found.group(1))):
            dead.add(str(path.parent))
    if not dead:
        return []
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri(cfg))
        experiment = client.get_experiment_by_name(cfg.experiment)
        runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") if experiment else []
        killed = [r.info.run_id for r in runs if r.data.tags.get("run_dir") in dead]
        for run_id in killed:
            client.set_terminated(run_id, status="KILLED")
    except Exception as err:  # noqa: BLE001 - housekeeping of earlier runs must not stop this one
        logging.getLogger(__name__).warning("could not mark killed MLflow runs: %s", err)
        return []
    if killed:
        logging.getLogger(__name__).info("marked %d MLflow run(s) of killed processes KILLED", len(killed))
    return killed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class Tracker:
    """One MLflow run: params (the whole config), metrics, artifacts; FAILED status if the body raises.

    Use as a context manager; the tag `mlflow.parentRunId` nests the run under another. Every run is tagged
    with its `provenance` (git commit and dirty flag, user, command, host, world size). On non-main
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
        tags = {"experiment": self.cfg.experiment, **provenance(), **self.tags}
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
