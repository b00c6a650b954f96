"""Experiment tracking behind one small interface: MLflow on the main process, nothing elsewhere.

The store defaults to `sqlite:///<cwd>/mlflow.db` with artifacts in `<cwd>/mlartifacts`: MLflow 3.17's file
store (`./mlruns`) raises ("maintenance mode"), and without an explicit artifact location artifact paths
would follow each process's working directory. `MLFLOW_TRACKING_URI` or `tracking.uri` points it at a server.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import logging
import math
import os
import shlex
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

from .config import Config
from .errors import ResumableError, UserError, cause, first_line
from .locks import flocked, gone, holder


def tracking_uri(cfg: Config) -> str:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


PROBE_TIMEOUT_S = 5


def check_store(cfg: Config) -> None:
    """`probe_store` for the tracking URI of `cfg` (nothing when tracking is off)."""
    if cfg.tracking.enabled:
        where = "tracking.uri" if cfg.tracking.uri else (
            "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the default tracking.uri")
        probe_store(tracking_uri(cfg), where)


def probe_store(uri: str, where: str, registry: bool = False) -> None:
    """Open the tracking store (or, with `registry`, the model registry's store) once, before any data or
    training, and turn whatever stops it into one line: an unreachable server within PROBE_TIMEOUT_S (the MLflow
    client would retry for minutes), an unknown URI scheme, a file that is no database, a store without a
    registry. `where` says where the URI came from. Nothing is written to a server."""
    from urllib.parse import urlparse

    kind = "model registry" if registry else "tracking store"
    fix = ("fix it, set registry.uri=sqlite:///<folder>/mlflow.db, or registry.enabled=false" if registry else
           "fix it, set tracking.uri=sqlite:///<folder>/mlflow.db, or tracking.enabled=false")
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname or "localhost", port), timeout=PROBE_TIMEOUT_S).close()
        except OSError as err:
            reason = err.strerror or type(err).__name__
            raise UserError(f"MLflow {kind.replace(' store', '')} server {uri} ({where}) is unreachable: {reason}; start the server or "
                            f"{fix}") from None
    from mlflow.tracking import MlflowClient

    with _creating(uri):
        try:
            with environment({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                              "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_TIMEOUT_S)}):
                if registry:
                    MlflowClient(registry_uri=uri).search_registered_models(max_results=1)
                else:
                    MlflowClient(uri).search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001 - a probe: any failure here is the store's, named in one line
            raise UserError(f"MLflow {kind} {uri} ({where}) cannot be used: {first_line(err)[:300]}; {fix}") from None
    if parsed.scheme == "sqlite" and uri.removeprefix("sqlite:///"):
        _probe_sqlite_write(uri, where, fix, kind)


def _creating(uri: str) -> contextlib.AbstractContextManager:
    """For a local sqlite store: the lock `<store>.lock` beside it, held while the first client opens it. MLflow
    creates a new store's tables on that first open, and of two processes doing so at once one failed ("Online
    migration expected to match one row ...") and was told to fix a store that was fine. A folder this process
    cannot write gets no lock: `_probe_sqlite_write` names it."""
    path = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if path is None or not path.name or not os.access(path.parent, os.W_OK):
        return contextlib.nullcontext()
    return flocked(path.with_name(f"{path.name}.lock"),
                   f"waiting for another process to finish creating the MLflow tracking store {path}")


def _probe_sqlite_write(uri: str, where: str, fix: str, kind: str) -> None:
    """A sqlite store that can be read but not written (a read-only file or folder, a write lock another process
    keeps) passed the read above and then failed at the run's first write in a hundred lines: take sqlite's
    write lock once, waiting at most PROBE_TIMEOUT_S, and roll back (nothing is written)."""
    path = Path(uri.removeprefix("sqlite:///"))
    problem = None
    if not os.access(path.parent, os.W_OK):
        problem = f"its folder {path.parent} is not writable (sqlite writes its journal there)"
    else:
        try:
            connection = sqlite3.connect(path, timeout=PROBE_TIMEOUT_S)
            try:
                connection.execute("BEGIN IMMEDIATE")
                connection.rollback()
            finally:
                connection.close()
        except sqlite3.Error as err:
            problem = str(err)
    if problem:
        raise UserError(f"MLflow {kind} {uri} ({where}) cannot be written: {problem}; make it writable, stop "
                        f"the process that holds it, or {fix}")


T = TypeVar("T")
LOCK_PAUSES_S = (0.1, 5.0)  # the first pause between tries of a write to a locked store, and the longest


def locked(err: BaseException) -> bool:
    """Whether `err` is sqlite's "database is locked" (another connection holds the store's write lock), however
    MLflow wraps it (an MlflowException from SQLAlchemy's OperationalError from sqlite3's)."""
    return cause(err, lambda e: isinstance(e, sqlite3.OperationalError) and "database is locked" in str(e)) is not None


def while_locked(call: Callable[[], T], uri: str, wait_s: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """`call()`, tried again while the store `uri` is locked by another process, with pauses doubling from
    LOCK_PAUSES_S[0] to LOCK_PAUSES_S[1], for `wait_s` seconds in all (tracking.lock_wait_s; each try also waits in
    sqlite's busy handler, which MLflow sets to 20 s); then a ResumableError saying so. Other errors pass as raised.
    A write that failed on the lock was rolled back by sqlite: trying it again writes it once."""
    start, pause = clock(), LOCK_PAUSES_S[0]
    while True:
        try:
            return call()
        except Exception as err:
            if not locked(err):
                raise
            left = start + wait_s - clock()
            if left <= 0:
                raise ResumableError(
                    f"MLflow tracking store {uri} stayed locked for {clock() - start:.0f} s (another process holds "
                    f"its write lock; tracking.lock_wait_s={wait_s:g}); stop that process") from err
            sleep(min(pause, left))
            pause = min(2 * pause, LOCK_PAUSES_S[1])


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ for the duration, then the environment as it was."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# MLflow 3 records an experiment's kind in this experiment tag: "Machine learning", not "GenAI apps & agents", in
# the UI's experiment-type selector; an experiment without it may be taken for a GenAI one, whose page opens on an
# empty trace overview. MLflow 3.17's UI lets its sidebar switch (GenAI | Model training) decide that for every
# experiment instead: `ui_link`.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
NOTE_TAG = "mlflow.note.content"  # a run's description: the UI renders it as markdown at the top of the run page
MAX_NOTE = 8000  # MLflow's limit on a run tag's value


def experiment_id(mlflow, name: str, uri: str) -> str:
    """The id of MLflow experiment `name`, created with an explicit artifact location if it is new; either way
    a model-training experiment (EXPERIMENT_KIND), unless someone chose another kind for it in the UI."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        if not any(key in experiment.tags for key in EXPERIMENT_KIND):  # made by an older version of the project
            for key, value in EXPERIMENT_KIND.items():
                mlflow.MlflowClient(uri).set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    artifacts = _default_artifacts(name, uri)
    try:
        return mlflow.create_experiment(name, artifact_location=artifacts and artifacts.as_uri(), tags=EXPERIMENT_KIND)
    except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent run
        return mlflow.get_experiment_by_name(name).experiment_id


def _default_artifacts(name: str, uri: str) -> Optional[Path]:
    """Where `experiment_id` puts a new experiment's artifacts: beside a sqlite store; None: the server decides."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name
    return None


def experiment_artifacts(cfg: Config) -> Optional[Path]:
    """The local folder that holds (or will hold) the artifacts of `cfg`'s experiment; None if they are remote."""
    from urllib.parse import urlparse

    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    experiment = MlflowClient(uri).get_experiment_by_name(cfg.experiment)
    if experiment is None:
        return _default_artifacts(cfg.experiment, uri)
    location = urlparse(experiment.artifact_location)
    return Path(location.path) if location.scheme in ("", "file") else None


def ui_link(uri: str, experiment: str, run_id: Optional[str] = None) -> str:
    """The MLflow UI's page of a run, or (no `run_id`) the experiment's runs sorted by name, which lists nested
    runs flat (`asac_fgsm · seed 1` beside `asac_fgsm · seed 2`); on the tracking server itself, or on
    `mlflow ui`'s default address for a local store. MLflow 3.17's UI opens every experiment on its GenAI
    views, whatever its kind, until the sidebar's switch is set to "Model training" (the browser keeps it);
    `workflowType=machine_learning` sets it for one visit."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    if run_id:
        return f"{base}/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"
    return (f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning"
            "&orderByKey=tags.%60mlflow.runName%60&orderByAsc=true")


def note(markdown: str, whole: str) -> str:
    """`markdown` as a run description within MLflow's limit: cut at a line end if too long, saying where the
    `whole` text is."""
    if len(markdown) <= MAX_NOTE:
        return markdown
    tail = f"\n\n… (cut to fit MLflow's description limit; the whole text: {whole})"
    return markdown[:MAX_NOTE - len(tail)].rsplit("\n", 1)[0] + tail


def log_table(client, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
    """`rows` as an MLflow table artifact (sortable in the UI's artifact view). A table logged again replaces the
    earlier one: MlflowClient.log_table would append to it (a resumed comparison, a rewritten sweep report)."""
    import posixpath
    import tempfile

    import pandas as pd

    folder = posixpath.dirname(artifact_file) or None
    if artifact_file not in {a.path for a in client.list_artifacts(run_id, folder)}:
        client.log_table(run_id, pd.DataFrame(rows), artifact_file)
        return
    with tempfile.TemporaryDirectory() as tmp:  # the file log_table writes, in its format, over the old one
        path = Path(tmp) / posixpath.basename(artifact_file)
        pd.DataFrame(rows).to_json(path, orient="split", index=False, date_format="iso")
        client.log_artifact(run_id, str(path), folder)


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


ENTRY_POINT_ENV = "ASAC_ENTRY_POINT"  # set by a sweep's driver: its trials' processes are Ray's or launched ones


def entry_point() -> str:
    """What the user ran: the module of `python -m <module>`, else the script's file name (MLflow's UI shows it as
    the run's source)."""
    if os.environ.get(ENTRY_POINT_ENV):
        return os.environ[ENTRY_POINT_ENV]
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return spec.name.removesuffix(".__main__")
    return Path(sys.argv[0]).name or "python"


def provenance() -> dict[str, str]:
    """Tags that say where a run came from: code version, who, what command, where, how many processes; MLflow's
    own `mlflow.*` tags repeat what its UI shows (the source column: entry point and commit; the user)."""
    commit, dirty = _git_state()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no $USER (some containers)
        user = "unknown"
    return {"git_commit": commit, "git_dirty": dirty, "mlflow.source.git.commit": commit,
            "mlflow.source.name": entry_point(), "mlflow.source.type": "LOCAL", "user": user,
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
    dead = set()
    runs_dir = Path(cfg.output_dir) / cfg.experiment
    for path in [*runs_dir.glob(f"*/{marker}"), *runs_dir.glob(f"*/seed_*/{marker}")]:  # runs; a comparison's seeds
        found = holder(path.read_text(errors="replace"))
        if found and gone(*found):
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


class Tracker:
    """One MLflow run: params (the whole config), metrics, artifacts; FAILED status if the body raises.

    Use as a context manager; the tag `mlflow.parentRunId` nests the run under another. Every run is tagged
    with its `provenance` (git commit and dirty flag, user, command, host, world size). On non-main
    processes, or with tracking.enabled false, every call is a no-op. `run_id` reopens an existing run (a
    resumed stage): it is set RUNNING again, and a metric already logged at a step is not logged twice.
    A store that another process keeps locked is waited for (`while_locked`, tracking.lock_wait_s), then the run
    stops with one line; its MLflow run is ended FAILED, waiting for the store as long again.
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
                self._store(lambda: self._client.update_run(self.run_id, status="RUNNING"))
            except mlflow.exceptions.MlflowException as err:
                from .errors import UserError

                raise UserError(f"resume: MLflow run {self.run_id} ({self.run_name}) is not in {uri}: resume from the "
                                "working directory of the run, or set tracking.uri to its store") from err
            self._logged = {}
            return self
        experiment = self._store(lambda: experiment_id(mlflow, self.cfg.experiment, uri))
        tags = {"experiment": self.cfg.experiment, **provenance(), **self.tags}
        run = self._store(lambda: self._client.create_run(experiment, run_name=self.run_name, tags=tags))
        self.run_id = run.info.run_id
        self.log_params(self.cfg.flat())
        return self

    def _store(self, call: Callable[[], T]) -> T:
        """`call()` on the store, waiting while another process keeps it locked (`while_locked`)."""
        return while_locked(call, tracking_uri(self.cfg), self.cfg.tracking.lock_wait_s)

    def log_params(self, params: dict[str, Any]) -> None:
        if self.active:
            from mlflow.entities import Param

            batch = [Param(k, str(v)) for k, v in params.items()]
            self._store(lambda: self._client.log_batch(self.run_id, params=batch))

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        """Log the finite numbers of `metrics` (NaN rates of empty groups are left out, not logged as NaN)."""
        if self.active:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and math.isfinite(v) and not self._was_logged(k, step or 0)]
            self._store(lambda: self._client.log_batch(self.run_id, metrics=batch))

    def _was_logged(self, key: str, step: int) -> bool:
        """In a reopened run: whether the attempt before already logged `key` at `step` (then this is a redone
        epoch or evaluation, and the history keeps one point per step)."""
        if self._logged is None:
            return False
        if key not in self._logged:
            history = self._store(lambda: self._client.get_metric_history(self.run_id, key))
            self._logged[key] = {m.step for m in history}
        if step in self._logged[key]:
            return True
        self._logged[key].add(step)
        return False

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        if self.active:
            self._store(lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        if self.active:
            self._store(lambda: log_table(self._client, self.run_id, rows, artifact_file))

    def with_client(self, write: Callable[[Any, str], None]) -> None:
        """`write(client, run_id)` against this run, with every store write's fault handling (e.g. logging an MLflow
        Model: mlflow_models.log_model, which imports this module, so the caller passes it in)."""
        if self.active:
            self._store(lambda: write(self._client, self.run_id))

    def describe(self, markdown: str, whole: str) -> None:
        """The run's description (markdown, shown first on its page); `whole` names where the full text is."""
        if self.active:
            self._store(lambda: self._client.set_tag(self.run_id, NOTE_TAG, note(markdown, whole)))

    def links(self) -> tuple[str, str]:
        """The run's page and its experiment's runs in the MLflow UI (`ui_link`); for an active tracker."""
        uri, run = tracking_uri(self.cfg), self._store(lambda: self._client.get_run(self.run_id))
        experiment = run.info.experiment_id
        return ui_link(uri, experiment, self.run_id), ui_link(uri, experiment)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.active and self.run_id is not None:
            status = "FINISHED" if exc_type is None else "FAILED"
            if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):  # Ctrl-C or SIGTERM (errors.py)
                status = "KILLED"
            self._store(lambda: self._client.set_terminated(self.run_id, status=status))
