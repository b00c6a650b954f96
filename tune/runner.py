"""Every Ray call of the sweep: start (or join) a cluster, build missing bases as tasks, run trials with Tune.

Locally Ray runs without a dashboard, with its session files under an explicit temp folder
($ASAC_RAY_TEMP_DIR; default: inside a private <tmp>/asac-ray-* made per sweep) and is shut down in a
`finally`, on Ctrl-C too. A watchdog process (tune/watchdog.py) then kills what is left of this Ray and removes
the folder the sweep made, also when the driver was killed with SIGKILL. Every local service listens on
127.0.0.1 only and requires a token (`tune.sweep.local_ray_environment`, which must run before Ray is imported).
"""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

# Set before Ray is imported: no usage reporting, and trials keep the driver's working directory instead of a
# per-trial one. Authentication: a local sweep's own token (local_environment); joining a cluster, the
# cluster's setting from the environment, else off (Ray's default token mode would write a token file into
# the home folder).
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"

import ray  # noqa: E402
from ray import tune  # noqa: E402

from distributed_asac.errors import UserError  # noqa: E402

from . import watchdog  # noqa: E402
from .bases import ensure_base  # noqa: E402
from .spec import Resources  # noqa: E402
from .trial import run_trial  # noqa: E402

TEMP_DIR_ENV = "ASAC_RAY_TEMP_DIR"
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's single-machine mode, node IP 127.0.0.1
REPO = Path(__file__).resolve().parents[1]


@contextmanager
def ray_session(address: Optional[str]) -> Iterator[None]:
    """A local Ray instance (address None) or a connection to `address` ('auto', 'ray://head:10001')."""
    with ExitStack() as made:  # the watchdog's clean-up runs after Ray's shutdown
        if address is None:
            if os.environ.get(LOOPBACK_ENV) != "0" or os.environ.get("RAY_AUTH_MODE") != "token":
                raise RuntimeError("a local Ray needs tune.sweep.local_ray_environment() before Ray is imported")
            # Local workers inherit the driver's environment: this makes `tune.*` importable in them.
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
            # Ray makes its temp folder world-writable (0777): by default it goes inside a folder private to
            # the user (0700) made for this sweep, which the watchdog removes.
            private = None if os.environ.get(TEMP_DIR_ENV) else tempfile.mkdtemp(prefix="asac-ray-")
            made.callback(watchdog.stop, watchdog.start(private))
            folder = os.environ.get(TEMP_DIR_ENV) or os.path.join(private, "r")
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=folder,
                     logging_level=logging.WARNING)
        else:
            # Remote nodes get the `tune` package shipped with the job; distributed_asac must be installed there.
            ray.init(address=address, runtime_env={"py_modules": [str(REPO / "tune")]},
                     logging_level=logging.WARNING)
        try:
            yield
        finally:
            ray.shutdown()


def check_resources(res: Resources) -> None:
    """Refuse a trial that no node can ever hold (Tune would otherwise wait for it forever)."""
    cluster = ray.cluster_resources()
    for name, want in (("CPU", res.cpu), ("GPU", res.gpu)):
        if want > cluster.get(name, 0):
            raise UserError(f"resources: a trial asks for {want:g} {name} but the Ray cluster has "
                            f"{cluster.get(name, 0):g}; lower 'resources' in the sweep file")


def build_bases(jobs: list[dict[str, Any]], res: Resources) -> dict[str, dict[str, Any]]:
    """Run `ensure_base` for each job as a Ray task with a trial's resources; key → entry, or {error}."""
    remote = ray.remote(ensure_base).options(num_cpus=res.cpu, num_gpus=res.gpu, max_retries=0)
    refs = {job["key"]: remote.remote(job) for job in jobs}
    entries = {}
    for key, ref in refs.items():
        try:
            entries[key] = ray.get(ref)
        except ray.exceptions.RayError as err:
            cause = getattr(err, "cause", None) or err
            entries[key] = {"error": f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:500]}"}
    return entries


def _trainable(config: dict[str, Any], jobs: dict[str, dict[str, Any]]) -> None:
    metrics = run_trial(jobs[config["trial"]])
    tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})


def run_trials(jobs: list[dict[str, Any]], res: Resources, max_concurrent: Optional[int], storage: Path,
               name: str) -> None:
    """One Tune run over `jobs`: a grid search over the trial names (so names and order are ours, and Tune's
    progress table shows one short column), the jobs themselves handed over through the object store."""
    trainable = tune.with_parameters(_trainable, jobs={job["name"]: job for job in jobs})
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": res.cpu, "gpu": res.gpu}),
        param_space={"trial": tune.grid_search([job["name"] for job in jobs])},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, trial_name_creator=_trial_name,
                                    trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    tuner.fit()


def _trial_name(trial) -> str:
    return trial.config["trial"]
