"""Running the trials: each trial's job, the base models they share, and every Ray call of the sweep.

A trial runs the CLI's own `pipeline.run` on a cached base model: its config is
`load_config(job.base_config, job.overrides + [output_dir=<its folder>, base_checkpoint=<the cached base>])`,
its record is written last (records.py). With `resources.processes > 1` it runs `python -m
accelerate.commands.launch --multi_gpu --num_processes N -m tune.trials <job.json>` on the GPUs Ray gave it
(CPU: gloo, with ACCELERATE_USE_CPU=true); every rank calls the same `pipeline.run` and rank 0 writes the
outcome.

Base models: each stage is trained once per distinct setting of what defines it (`spec.base_fields`) and shared by
every trial that needs it: stage 0's θ by every seed (it has its own, `pretrain.seed`), stage 1's M by trials that
differ only in stage 2 (the probe kind), the base of stages 1–2 by trials that differ only in stage 3. An entry is
`<output_dir>/base_cache/<key>/` for a base (the key: `spec.base_key`), `base_cache/stage1/<key>/` for an M and
`base_cache/stage0/<key>/` for a θ, each built by a run that starts from the cached entries below it (`model.weights`
for θ, `stage1_checkpoint` for M) and ends after its stage. Inside: that run's folder (a base's `probe/` is the
checkpoint stage 3 starts from) and `base.json`, written last and atomically, so an entry without it is unfinished
and is rebuilt. A file lock per entry makes concurrent builders (two sweeps sharing a cache, or tasks on a cluster
with a shared file system) train it once.

Ray is imported by the functions that start it, so `--dry-run`, `--report` and the tests of the sweep file
never pay for it. Locally Ray runs without a dashboard, with its session files under an explicit temp folder
($ASAC_RAY_TEMP_DIR; default: inside a private <tmp>/asac-ray-* made per sweep) and is shut down in a
`finally`, on Ctrl-C too. A watchdog process (tune/watchdog.py) then kills what is left of this Ray and removes
the folder the sweep made, also when the driver was killed with SIGKILL. Every local service listens on
127.0.0.1 only and requires a token (`local_ray_environment`, which must run before Ray is imported).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional

from filelock import FileLock

from distributed_asac.checkpoint import PRETRAINED
from distributed_asac.config import Config, load_config
from distributed_asac.errors import UserError
from distributed_asac.failpoints import failpoint
from distributed_asac.files import atomic_write
from distributed_asac.runtime import close_process_group
from distributed_asac.tracking import ENTRY_POINT_ENV, entry_point, environment

from . import watchdog
from .records import ERROR_FILE, TrialRecord, label_trial, read_record, write_record
from .report import format_setting, is_base_axis
from .spec import Resources, base_fields, base_key

REPO = Path(__file__).resolve().parents[1]
OUTCOME = "outcome.json"  # what rank 0 of a launched trial hands back to the trial process
CACHE_DIR = "base_cache"
ENTRY_FILE = "base.json"
TEMP_DIR_ENV = "ASAC_RAY_TEMP_DIR"
NICENESS_ENV = "RAY_worker_niceness"
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's single-machine mode, node IP 127.0.0.1


@dataclass
class TrialJob:
    """One trial as the driver hands it to Ray and to a launched trial's processes (as JSON)."""

    name: str  # the trial's name: its folder, Ray trial and MLflow run
    base_config: str  # the experiment YAML every trial starts from
    overrides: list[str]  # its load_config overrides (absolute paths, tracking URI and seed included)
    folder: str  # <sweep>/trials/<name>/: the pipeline's output_dir and trial.json
    parent_run_id: str  # the sweep's MLflow parent run ...
    tracking_uri: str  # ... and store
    experiment: str  # the MLflow experiment
    resources: Resources  # what it reserves; processes > 1 launches Accelerate inside the trial
    axes: dict[str, Any]  # what the MLflow run and the report show
    grids: list[str]
    key: Optional[str]  # its cached base; None when the trial names its own base_checkpoint
    output_dir: str  # the sweep's output_dir: holds base_cache/
    base: Optional[dict[str, Any]] = None  # the cache entry {checkpoint, results}, or {error} if building failed
    variants: Optional[list[dict]] = None  # pipeline.run's variants (None: the config's own fine-tune)
    label: Optional[str] = None  # pipeline.run's label: what tells its MLflow runs apart (a base build's setting)
    until: Optional[str] = None  # pipeline.run's last stage: "pretrain" or "base" for a build of stage 0 or 1

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialJob:
        return cls(**{**data, "resources": Resources(**data["resources"])})


def load_trial_config(job: TrialJob) -> Config:
    return load_config(job.base_config, job.overrides)


def run_trial(job: TrialJob) -> dict[str, Any]:
    """Run one trial unless its record says it finished; return its final metrics.

    The record is written last: a trial killed before that is unfinished, and `--resume` removes its MLflow
    run and runs it again. A trial that raises gets a FAILED MLflow run with its error, a `failed` record and
    an `error.txt` traceback in its folder, and returns no metrics: raised to Ray, the failure printed Ray's
    41-line traceback and an error file in Ray's session folder, deleted when the sweep ends.
    """
    folder = Path(job.folder)
    done = read_record(folder)
    if done is not None and done.status == "finished":
        return done.metrics  # a resumed sweep never retrains a finished trial
    folder.mkdir(parents=True, exist_ok=True)
    if job.key and job.base is None:  # its base is not cached yet: train it here (or wait for the trial that does)
        try:
            job = replace(job, base=ensure_base(replace(job, name=f"base-{job.key}")))
        except Exception as err:  # the trial fails with it, naming it; the sweep goes on
            job = replace(job, base={"error": f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:500]}"})
    record = TrialRecord(job.name, job.axes, job.grids, "pending", base=(job.base or {}).get("results", {}).get("base"),
                         started=time.time())
    try:
        outcome = call_pipeline(_with_base(job, folder))
        [(record.model, record.metrics)] = outcome["results"].items()  # the one fine-tuned model of the trial
        record.status, record.run_dir = "finished", outcome["run_dir"]
    except Exception as err:  # any error of a trial is its result, and the sweep goes on
        (folder / ERROR_FILE).write_text(traceback.format_exc())
        record.status, record.error = "failed", f"{type(err).__name__}: {err}"
    record.seconds = round(time.time() - record.started, 1)
    failpoint("trial.before_record", status=record.status)
    record.mlflow_run_ids = label_trial(job, record)
    write_record(folder, record)
    return record.metrics


def _with_base(job: TrialJob, folder: Path) -> TrialJob:
    """The job with the trial's own output folder and its cached base checkpoint added to the overrides."""
    base = job.base or {}  # empty when the trial names its own base_checkpoint
    if "error" in base:
        raise RuntimeError(f"its base model could not be trained: {base['error']}")
    extra = [f"output_dir={json.dumps(str(folder))}"]
    if "checkpoint" in base:
        extra.append(f"base_checkpoint={json.dumps(base['checkpoint'])}")
    return replace(job, overrides=[*job.overrides, *extra])


def call_pipeline(job: TrialJob) -> dict[str, Any]:
    """`pipeline.run(load_config(...), variants, parent_run_id)` here, or under `accelerate launch` when the job
    asks for several processes; returns {run_dir, results}."""
    if job.resources.processes > 1:
        return _launch(job)
    import torch

    from distributed_asac import pipeline

    # One thread per reserved CPU: trials share the machine, and oversubscribed BLAS threads slow all of them.
    torch.set_num_threads(max(1, int(job.resources.cpu)))
    out = pipeline.run(load_trial_config(job), variants=job.variants, parent_run_id=job.parent_run_id, label=job.label,
                       until=job.until)
    return {"run_dir": str(out.run_dir), "results": {k: v for k, v in out.results.items() if k != "probe"}}


def _launch(job: TrialJob) -> dict[str, Any]:
    folder, processes = Path(job.folder), job.resources.processes
    folder.mkdir(parents=True, exist_ok=True)
    job_path, outcome_path, log_path = folder / "job.json", folder / OUTCOME, folder / "launch.log"
    outcome_path.unlink(missing_ok=True)
    # Each launched process runs the in-process path with its share of the trial's CPUs.
    share = Resources(cpu=max(1.0, job.resources.cpu // processes), gpu=job.resources.gpu, processes=1)
    job_path.write_text(json.dumps(asdict(replace(job, resources=share)), allow_nan=True))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if job.resources.gpu == 0:
        env["ACCELERATE_USE_CPU"] = "true"  # else --multi_gpu on CPU starts ranks that never talk (docs/distributed.md)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
               "-m", "tune.trials", str(job_path)]
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


# ---- the base-model cache ----

# The sub-folder of base_cache/ that holds each cached stage's entries (a base's: base_cache/ itself).
STAGE_DIRS = {"pretrain": "stage0", "base": "stage1", "probe": ""}


def entry_dir(output_dir: str | Path, key: str, stage: str = "probe") -> Path:
    return Path(output_dir) / CACHE_DIR / STAGE_DIRS[stage] / key


def read_entry(folder: Path) -> Optional[dict[str, Any]]:
    """The finished entry's {key, checkpoint, results, fields}, or None if it was never finished."""
    path = folder / ENTRY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def ensure_base(job: TrialJob) -> dict[str, Any]:
    """Return the cache entry for `job`'s base, training it first if no finished entry exists: the same
    `pipeline.run` as the CLI, with only the `base` variant, nested under the sweep's parent run, stage 2 on the
    cached stage-1 M (and stages 0 and 1 cached first where missing: `ensure_stage`)."""
    cfg = load_trial_config(job)
    if base_key(cfg) != job.key:
        raise RuntimeError(f"base key mismatch for {job.key}: the trial's config hashes to {base_key(cfg)}")
    return ensure_stage(job, cfg, "probe")


def ensure_stage(job: TrialJob, cfg: Config, stage: str) -> dict[str, Any]:
    """The cache entry of `cfg`'s model of `stage` (spec.CACHED_STAGES), built first where missing by a run that
    starts from the cached entries of the stages below it and ends after `stage`: {key, stage, checkpoint (θ's file,
    M's base/ folder or the base's probe/ folder), results, fields}."""
    key = base_key(cfg, stage)
    folder = entry_dir(job.output_dir, key, stage)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".lock")):
        entry = read_entry(folder)
        if entry is not None:
            return entry
        overrides = [*job.overrides, *_start_from_cache(job, cfg, stage), f"output_dir={json.dumps(str(folder))}",
                     "base_checkpoint=null"]
        if stage == "base":  # the M of either probe kind, bit for bit (models.create_model): build it the default's way
            overrides.append("model.protected_classifier=probe")
        # what sets the build's MLflow runs apart: stage 0 is shared by every seed
        label = f"pretrain.seed {cfg.pretrain.seed}" if stage == "pretrain" else base_label(job.axes)
        build = replace(job, overrides=overrides, variants=[{"mode": "base"}] if stage == "probe" else None,
                        folder=str(folder), label=label, until=None if stage == "probe" else stage)
        outcome = call_pipeline(build)
        run_dir = Path(outcome["run_dir"])
        checkpoint = run_dir / "pretrain" / PRETRAINED if stage == "pretrain" else run_dir / stage
        entry = {"key": key, "stage": stage, "checkpoint": str(checkpoint), "results": outcome["results"],
                 "fields": base_fields(cfg, stage)}
        atomic_write(folder / ENTRY_FILE, json.dumps(entry, indent=2, allow_nan=True))
        return entry


def _start_from_cache(job: TrialJob, cfg: Config, stage: str) -> list[str]:
    """The overrides that start the build of `stage` from the cached models of the stages below it (building them
    first where missing): stage 0's θ as `model.weights` (stage 0 then does not run again), stage 1's M as
    `stage1_checkpoint` (unless the trial names its own)."""
    overrides = []
    if stage != "pretrain" and cfg.pretrain.epochs > 0:
        theta = ensure_stage(job, cfg, "pretrain")
        overrides += [f"model.weights={json.dumps(theta['checkpoint'])}", "pretrain.epochs=0"]
    if stage == "probe" and not cfg.stage1_checkpoint:
        overrides.append(f"stage1_checkpoint={json.dumps(ensure_stage(job, cfg, 'base')['checkpoint'])}")
    return overrides


def base_label(axes: dict[str, Any]) -> str:
    """What sets a base build's MLflow runs apart under the sweep's parent: the trial's axes that change the
    base model, and the seed (`base · backbone=resnet18 · seed 0`)."""
    shown = [f"{a}={format_setting(v)}" for a, v in axes.items() if is_base_axis(a)]
    return " · ".join([*shown, f"seed {axes.get('seed')}"])


def prepare_data(configs: list[Config]) -> None:
    """Generate each synthetic dataset once, in the driver, before any base or trial reads it.

    Concurrent runs pointing at one `data.root` would otherwise all start generating into it; two different
    generated datasets sharing a root would overwrite each other, so that is refused.
    """
    from distributed_asac.data.datasets import generate_synthetic, synthetic_arguments

    wanted: dict[str, Any] = {}  # data.root → the data config that generates it
    for cfg in configs:
        if cfg.data.name != "synthetic":
            continue
        first = wanted.setdefault(cfg.data.root, cfg.data)
        if synthetic_arguments(first) != synthetic_arguments(cfg.data):
            raise UserError(f"two generated datasets with different settings share data.root {cfg.data.root!r}; "
                            "give each its own data.root")
    for data in wanted.values():
        generate_synthetic(data)


def check_selection(configs: list[Config]) -> None:
    """Refuse, before the sweep starts, a selection rule that needs every group in a valid split that lacks one
    (`pipeline.check_selection`), once per dataset: every trial on it would fail the same way."""
    from distributed_asac.data.datasets import DATASETS
    from distributed_asac.pipeline import check_selection as check
    from distributed_asac.selection import NEEDS_GROUPS

    checked = set()
    for cfg in configs:
        key = json.dumps(asdict(cfg.data), sort_keys=True)
        if cfg.finetune.select in NEEDS_GROUPS and key not in checked:
            checked.add(key)
            split_file = str(Path(cfg.output_dir) / cfg.experiment / "lfw_split.json")
            check(cfg, DATASETS.get(cfg.data.name)(cfg.data, split_file, True).valid)


# ---- Ray ----

def local_ray_environment() -> None:
    """Settings of a local Ray, read when Ray is imported: every service listens on 127.0.0.1 only (Ray's
    single-machine mode, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which makes the node IP the loopback address),
    and token authentication with a fresh random token that lives only in the environment of this process
    tree (no token file). Workers run at the driver's priority: Ray's default lowers theirs (niceness 15), so
    beside any other job on the machine a sweep's trials, the work the user started, crawled (two trials at 4%
    of a core each beside two busy loops, measured here); a value the user set in RAY_worker_niceness is kept.
    A cluster (--address) keeps its own settings: see README.md, Ablation sweeps."""
    os.environ.setdefault(NICENESS_ENV, "0")  # read by the raylet when it starts
    wanted = {LOOPBACK_ENV: "0", "RAY_AUTH_MODE": "token"}
    if all(os.environ.get(k) == v for k, v in wanted.items()) and os.environ.get("RAY_AUTH_TOKEN"):
        return  # made earlier in this process (a second sweep)
    if "ray" in sys.modules:
        raise RuntimeError("Ray was imported before its local settings were made")
    os.environ.update(wanted, RAY_AUTH_TOKEN=secrets.token_hex(32))


def _ray():
    """Ray, imported after the settings it reads at import: no usage reporting, and trials keep the driver's
    working directory instead of a per-trial one. Authentication: a local sweep's own token
    (`local_ray_environment`); joining a cluster, the cluster's setting from the environment, else off (Ray's
    default token mode would write a token file into the home folder)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    import ray

    return ray


@contextmanager
def ray_session(address: Optional[str]) -> Iterator[None]:
    """A local Ray instance (address None) or a connection to `address` ('auto', 'ray://head:10001'). Its
    workers tag their MLflow runs with the driver's entry point (what the user ran), not Ray's worker script."""
    ray = _ray()
    source = {ENTRY_POINT_ENV: entry_point()}
    with ExitStack() as made:  # the watchdog's clean-up runs after Ray's shutdown
        if address is None:
            made.enter_context(environment(source))  # local workers inherit the driver's environment
            if os.environ.get(LOOPBACK_ENV) != "0" or os.environ.get("RAY_AUTH_MODE") != "token":
                raise RuntimeError("a local Ray needs tune.trials.local_ray_environment() before Ray is imported")
            # Local workers inherit the driver's environment: this makes `tune.*` importable in them.
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
            # Ray makes its temp folder world-writable (0777): by default it goes inside a folder private to
            # the user (0700) made for this sweep, which the watchdog removes.
            private = None if os.environ.get(TEMP_DIR_ENV) else tempfile.mkdtemp(prefix="asac-ray-")
            dog = watchdog.start(private)
            made.callback(watchdog.stop, dog)
            folder = os.environ.get(TEMP_DIR_ENV) or os.path.join(private, "r")
            context = ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=folder,
                               logging_level=logging.WARNING)
            # Ray's processes log into this folder; the agents' renamed environment can hide the token.
            watchdog.watch(dog, context.address_info["session_dir"])
        else:
            # Remote nodes get the `tune` package shipped with the job; distributed_asac must be installed there.
            ray.init(address=address, runtime_env={"py_modules": [str(REPO / "tune")], "env_vars": source},
                     logging_level=logging.WARNING)
        try:
            yield
        finally:
            ray.shutdown()


def check_resources(res: Resources) -> None:
    """Refuse a trial that no node can ever hold (Tune would otherwise wait for it forever): a trial runs on one
    node, so it must fit the largest, not the cluster's sum."""
    nodes = [node["Resources"] for node in _ray().nodes() if node.get("Alive")]
    for name, want in (("CPU", res.cpu), ("GPU", res.gpu)):
        largest = max((node.get(name, 0) for node in nodes), default=0)
        if want > largest:
            raise UserError(f"resources: a trial asks for {want:g} {name} but the largest node of the Ray cluster "
                            f"has {largest:g} (a trial runs on one node); lower 'resources' in the sweep file")


def _reads_token(path: str, token: str) -> bool:
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


def check_shared_folder(folder: Path) -> None:
    """Refuse a sweep folder that a node of the cluster cannot read: the driver writes a token there and a task
    pinned to every alive node reads it back. Trials write their records, runs and the base cache under the
    sweep's output_dir, and Tune its results, from whichever node runs them."""
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = secrets.token_hex(16)
    path = folder / f".shared-check-{token}"
    path.write_text(token)
    try:
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        reader = ray.remote(_reads_token)
        refs = [reader.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                .remote(str(path), token) for node in nodes]
        blind = [node["NodeManagerAddress"] for node, seen in zip(nodes, ray.get(refs)) if not seen]
    finally:
        path.unlink(missing_ok=True)
    if blind:
        raise UserError(f"output_dir: the sweep folder {folder} is not readable on node(s) {', '.join(blind)} of the "
                        "Ray cluster; set output_dir to a path on a file system every node mounts at the same path")


def _report_epoch(stage: str, epoch: int, epochs: int, metrics: dict[str, float]) -> None:
    """An epoch listener (distributed_asac.loop): every fine-tuning epoch but the last reports its metrics to Tune,
    so that a scheduler can stop the trial there; the last epoch's come with the trial's result."""
    from ray import tune

    if stage == "finetune" and epoch < epochs:
        tune.report({"epoch": epoch, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})


def _trainable(config: dict[str, Any], jobs: dict[str, TrialJob]) -> None:
    from ray import tune

    from distributed_asac.loop import EPOCH_LISTENERS

    job = jobs[config["trial"]]
    # In-process trials report every epoch; a launched one (processes > 1) reports at its end only.
    EPOCH_LISTENERS.append(_report_epoch)
    try:
        metrics = run_trial(job)
    finally:
        EPOCH_LISTENERS.remove(_report_epoch)
    if not metrics:  # failed (error.txt in its folder, named by the sweep's last lines): no result for a scheduler
        return
    epochs = load_trial_config(job).finetune.epochs
    tune.report({"epoch": epochs, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})


def trial_resources(res: Resources):
    """What each trial of `run_trials` reserves: one bundle of `res.cpu` CPUs and `res.gpu` GPUs on one node (a
    fraction: Ray places 1/gpu trials on one GPU and shows each the same device)."""
    _ray()
    from ray import tune

    return tune.PlacementGroupFactory([{"CPU": res.cpu, "GPU": res.gpu}])


def run_trials(jobs: list[TrialJob], res: Resources, max_concurrent: Optional[int], storage: Path, name: str,
               scheduler=None) -> dict[str, dict[str, Any]]:
    """One Tune run over `jobs`: a grid search over the trial names (so names and order are ours, and Tune's
    progress table shows one short column), the jobs themselves handed over through the object store. With a
    `scheduler` (search.per_group_asha) trials may be stopped early. Returns each trial's last reported result."""
    _ray()
    from ray import tune

    trainable = tune.with_parameters(_trainable, jobs={job.name: job for job in jobs})
    tuner = tune.Tuner(
        tune.with_resources(trainable, trial_resources(res)),
        param_space={"trial": tune.grid_search([job.name for job in jobs])},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, trial_name_creator=_trial_name,
                                    trial_dirname_creator=_trial_name, scheduler=scheduler,
                                    reuse_actors=False),  # a stopped trial's process ends with it
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    return {result.config["trial"]: result.metrics or {} for result in tuner.fit() if result.config}


def _trial_name(trial) -> str:
    return trial.config["trial"]


def main(argv: list[str]) -> None:
    """Entry of each process of a launched trial: run the job; rank 0 writes the outcome."""
    from accelerate import PartialState

    from distributed_asac.logs import setup_logging

    setup_logging()
    job = TrialJob.from_dict(json.loads(Path(argv[0]).read_text()))
    outcome = call_pipeline(job)
    if PartialState().is_main_process:
        atomic_write(Path(job.folder) / OUTCOME, json.dumps(outcome, allow_nan=True))
    close_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
