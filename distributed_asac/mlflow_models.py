"""The models a user takes away: every finished model as an MLflow Model of its run, and each row's chosen model
registered in the MLflow Model Registry (docs/mlflow.md).

An MLflow Model here is MLflow's pyfunc format built from code (served_model.py, copied into the model): its
artifacts are the checkpoint's `model.safetensors` and `config.yaml`, so loading one never unpickles anything;
its signature takes uint8 RGB images N × S × S × 3 and returns the target's probability and predicted label; its
requirements are the versions installed where the run ran, listed explicitly (MLflow would otherwise infer them
by loading the model in a subprocess, seconds per model).

Registration takes, per row, the checkpoint folder that the run's selection rule chose (`Chosen`): the folder
holds the weights, the config and results.json, and its run folder's state.json names the MLflow run whose newest
MLflow Model it is (`pipeline.finish_model` logs it). results.json does not name the model: it stays the same for
the same numbers (a resumed run, the other layout of a comparison).
Each becomes a version of the registered model `registry.name` ("{experiment}-{row}"), tagged and described with
the rule, the seed, the commit, the test DEO, ACC and worst-group ACC with their intervals and the row's verdicts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shlex
import shutil
import sys
from importlib import metadata
from pathlib import Path

from .checkpoint import CONFIG, WEIGHTS
from .config import Config
from .errors import ResumableError, UserError, store_full
from .metrics import COLUMNS
from .resume import STATE
from .tracking import check_store, environment, experiment_artifacts, probe_store, provenance, tracking_uri

CODE = Path(__file__).with_name("served_model.py")
PROJECT = "distributed_asac"
# What served_model.py imports (besides the project): pinned at the versions of the run's environment.
IMPORTED = ("mlflow", "torch", "torchvision", "numpy", "pandas", "pyyaml", "safetensors")
SHOWN = ("DEO", "ACC", "worst_group_ACC")  # the figures a registered version carries, each with its interval
FORMATS = {c.name: c.fmt for c in COLUMNS}


def registry_uri(cfg: Config) -> str:
    return cfg.registry.uri or os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri(cfg)


@functools.lru_cache(maxsize=None)
def requirements() -> tuple[str, ...]:
    """`name==version` of each package the model's code imports, as installed here."""
    return tuple(f"{name}=={metadata.version(name)}" for name in (*IMPORTED, PROJECT))


def signature(image_size: int):
    """uint8 N × S × S × 3 in; per image the target's probability (float32) and predicted label (int64) out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    # An unnamed tensor: the model receives the array itself (a named one arrives as {name: array})
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, image_size, image_size, 3))]),
                          outputs=Schema([ColSpec("float", "probability"), ColSpec("long", "label")]))


def log_model(client, run_id: str, folder: Path, row: str, cfg: Config) -> None:
    """Log the checkpoint in `folder` as an MLflow Model of run `run_id` (`client`'s store). A store that refuses it (too large for the artifact store, a server that rejects the
    upload) stops the run with one line; the models finished before it are kept."""
    import warnings

    import mlflow
    from mlflow.models import Model

    try:
        # Created here, in the run's experiment: Model.log alone files it under the default experiment 0, whose
        # artifacts land in ./mlruns of the working directory (and that folder turns MLflow to its file store).
        logged = client.create_logged_model(client.get_run(run_id).info.experiment_id, "model", run_id,
                                            tags={"row": row})
        # MLflow "downloads" the local checkpoint files with a progress bar each: two bars per model on stderr
        with warnings.catch_warnings(), environment({"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):
            # An input example would make MLflow load and run the model once more per log; the signature says it all
            warnings.filterwarnings("ignore", ".*An input example was not provided", UserWarning)
            Model.log(None, mlflow.pyfunc, run_id=run_id, model_id=logged.model_id, python_model=str(CODE),
                      artifacts={"weights": str(folder / WEIGHTS), "config": str(folder / CONFIG)},
                      signature=signature(cfg.data.image_size), pip_requirements=list(requirements()),
                      metadata=model_metadata(row, cfg))
    except mlflow.exceptions.MlflowException as err:
        if store_full(err):  # the tracking store, not the artifact store: the entry points' line for a full store
            raise
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ResumableError(f"the MLflow Model of {row} ({folder}) could not be stored in the artifact store of "
                             f"{tracking_uri(cfg)}: {reason}; make room there or raise its upload limit") from None


def model_metadata(row: str, cfg: Config) -> dict[str, object]:
    """What the MLmodel file says the model is: the loader (`predict.py`) checks the project and the image size."""
    return {"project": PROJECT, "row": row, "experiment": cfg.experiment, "target": cfg.data.target,
            "protected": cfg.data.protected, "image_size": cfg.data.image_size, "backbone": cfg.model.backbone,
            "git_commit": provenance()["git_commit"],
            "input": f"uint8 RGB images N x {cfg.data.image_size} x {cfg.data.image_size} x 3, centre-cropped and "
                     "resized as the run's data (distributed_asac.data.images.load_image)",
            "output": f"probability: P({cfg.data.target} = 1); label: the predicted {cfg.data.target} (0 or 1)"}


def model_name(cfg: Config, row: str) -> str:
    """The registered model of `row`: `registry.name` with {experiment} and {row} filled in."""
    try:
        return cfg.registry.name.format(experiment=cfg.experiment, row=row)
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(f"config key 'registry.name': {cfg.registry.name!r} is not a name template ({err!r}); use "
                        "{experiment} and {row} as placeholders, e.g. registry.name={experiment}-{row}") from None


def check_before_run(cfg: Config, rows: list[str], seeds: int) -> None:
    """Before any training of a comparison of `rows` (with the base, if it trains one) over `seeds` seeds:
    `check_registry`, then `check_room` for every model it logs. Nothing when tracking is off."""
    if not cfg.tracking.enabled:
        return
    check_store(cfg)  # the tracking store first: the checks below read it
    check_registry(cfg, rows)
    # per seed: each row's checkpoint artifact and MLflow Model, and the probe's checkpoint
    check_room(cfg, seeds * (2 * len(rows) + (0 if cfg.base_checkpoint else 1)))


def check_registry(cfg: Config, rows: list[str]) -> None:
    """Refuse a registered-model name MLflow would refuse (or one template for all rows) and a registry store that
    cannot be read or written, each in one line; nothing when tracking or registration is off."""
    if not (cfg.tracking.enabled and cfg.registry.enabled):
        return
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name  # MLflow's own rule, so that no name passes it here only

    if "{row}" not in cfg.registry.name:
        raise UserError(f"config key 'registry.name': {cfg.registry.name!r} lacks {{row}}, so every row would be a "
                        "version of one registered model; add it, e.g. registry.name={experiment}-{row}")
    for row in rows:
        name = model_name(cfg, row)
        try:
            _validate_model_name(name)
        except MlflowException as err:
            raise UserError(f"config key 'registry.name': row {row} would be registered as {name!r}, which MLflow "
                            f"refuses ({err.message}); change registry.name or experiment, or set "
                            "registry.enabled=false") from None
    where = "registry.uri" if cfg.registry.uri else (
        "$MLFLOW_REGISTRY_URI" if os.environ.get("MLFLOW_REGISTRY_URI") else "the tracking store")
    probe_store(registry_uri(cfg), where, registry=True)


def check_room(cfg: Config, copies: int) -> None:
    """Refuse a run whose `copies` model-sized files cannot fit the free space of a local artifact store (that of
    a remote one cannot be known: there a model that does not fit stops the run when it is logged)."""
    root = experiment_artifacts(cfg)
    if root is None:
        return
    import torch

    from .models import create_model

    with torch.device("meta"):  # the parameter count without allocating the weights
        network = create_model(cfg.model.backbone, protected_classifier=cfg.model.protected_classifier)
    size = sum(t.numel() * t.element_size() for t in network.state_dict().values())
    existing = next(p for p in (root, *root.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < copies * size:
        raise UserError(f"the MLflow artifact store {root} has {free / 2**20:.0f} MiB free, but this run logs "
                        f"{copies} copies of a {cfg.model.backbone} model ({size / 2**20:.1f} MiB each, "
                        f"{copies * size / 2**20:.0f} MiB); free space there or set tracking.uri to a store on "
                        "another disk")


@dataclasses.dataclass
class Chosen:
    """A row's model to register: the checkpoint folder its run's selection rule chose."""

    row: str  # what its registered model is named after: a comparison's row, a sweep's setting
    seed: int
    folder: Path  # <run folder>/<model>: model.safetensors, config.yaml, results.json ({model: report}); <run folder>/state.json
    selection: str  # the rule that chose it, in words
    verdicts: dict[str, str] = dataclasses.field(default_factory=dict)  # reference (base, plain) → the row's verdicts (report.verdict_line)


@dataclasses.dataclass
class Registered:
    name: str
    version: str
    chosen: Chosen


def register(cfg: Config, chosen: list[Chosen], context: str) -> list[Registered]:
    """Each chosen model as a version of its row's registered model (`model_name`), tagged and described;
    `context` says where it came from (the comparison's run folder). A model registered before (a resumed
    comparison) keeps its version. Nothing when tracking or registration is off."""
    if not (cfg.tracking.enabled and cfg.registry.enabled):
        return []
    from mlflow.tracking import MlflowClient

    import mlflow
    from mlflow.exceptions import MlflowException

    # create_model_version resolves a models:/<id> source in the process's tracking store, not the client's
    mlflow.set_tracking_uri(tracking_uri(cfg))
    client = MlflowClient(tracking_uri(cfg), registry_uri(cfg))
    out = []
    for item in chosen:
        name, report = model_name(cfg, item.row), json.loads((item.folder / "results.json").read_text())[item.folder.name]
        try:
            run_id, model_id = _logged_model(client, item)
            _ensure_registered(client, name, item.row, cfg)
            source = f"models:/{model_id}"
            existing = [v for v in client.search_model_versions(f"name = '{name}'") if v.source == source]
            version = existing[0] if existing else client.create_model_version(
                name, source, run_id=run_id, tags=_tags(item, report), description=_description(item, report, context),
                model_id=model_id)
        except MlflowException as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise ResumableError(f"{item.row} (seed {item.seed}) could not be registered as {name} in "
                                 f"{registry_uri(cfg)}: {reason}; the run's results are kept: fix the registry or set "
                                 "registry.enabled=false") from None
        out.append(Registered(name, str(version.version), item))
    return out


def _logged_model(client, item: Chosen) -> tuple[str, str]:
    """(run id, model id) of the MLflow Model of `item`: the newest one its MLflow run logged (a stage that was
    redone after a kill may have logged one before)."""
    from mlflow.exceptions import MlflowException

    run_id = json.loads((item.folder.parent / STATE).read_text())["mlflow_runs"].get(item.folder.name)
    experiment = client.get_run(run_id).info.experiment_id if run_id else None
    found = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'", max_results=1,
                                        order_by=[{"field_name": "creation_timestamp", "ascending": False}]) if run_id else []
    if not found:
        raise MlflowException(f"the MLflow run of {item.folder} holds no MLflow Model (tracking was off?)")
    return run_id, found[0].model_id


def _ensure_registered(client, name: str, row: str, cfg: Config) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, tags={"project": PROJECT, "experiment": cfg.experiment, "row": row},
            description=f"The **{row}** row of experiment `{cfg.experiment}` ({cfg.data.target} classifier, "
                        f"protected attribute {cfg.data.protected}): one version per chosen model (seed, run).")


def _interval(report: dict, metric: str) -> str:
    """`0.812 [0.701, 0.903]`: the value and its 95% bootstrap interval, as the tables print the metric."""
    fmt, (low, high) = FORMATS[metric], report["ci95_bootstrap"][metric]
    return f"{fmt.format(report[metric])} [{fmt.format(low)}, {fmt.format(high)}]"


def _tags(item: Chosen, report: dict) -> dict[str, str]:
    tags = {"selection": item.selection, "seed": str(item.seed), "git_commit": provenance()["git_commit"],
            "checkpoint": str(item.folder)}
    tags.update({f"test_{metric}": _interval(report, metric) for metric in SHOWN})
    tags.update({f"verdict_vs_{reference}": line for reference, line in item.verdicts.items()})
    return tags


def _description(item: Chosen, report: dict, context: str) -> str:
    figures = ", ".join(f"{metric} {_interval(report, metric)}" for metric in SHOWN)
    return (f"**{item.row}, seed {item.seed}**, chosen by {item.selection}, from {context}.\n\n"
            f"Test {figures} (95% percentile bootstrap over the {report['n']} test images).\n\n"
            + ("Verdicts of the row (paired differences, 95% intervals):\n\n" if item.verdicts else "")
            + "".join(f"- {item.row} − {reference}: {line}\n" for reference, line in item.verdicts.items()) + "\n"
            + "Input: uint8 RGB images N × S × S × 3; output: the target's probability and predicted label "
              "(docs/mlflow.md).")


def closing_lines(cfg: Config, registered: list[Registered]) -> str:
    """What a comparison or sweep prints last: each registered name and version, and the commands that load and
    serve one."""
    env = f"MLFLOW_TRACKING_URI={tracking_uri(cfg)}"
    if registry_uri(cfg) != tracking_uri(cfg):
        env += f" MLFLOW_REGISTRY_URI={registry_uri(cfg)}"
    lines = [f"Registered models ({registry_uri(cfg)}; load each in Python with "
             "mlflow.pyfunc.load_model(URI), docs/mlflow.md):"]
    for r in registered:
        lines.append(f"  {r.name} version {r.version} ({r.chosen.row}, seed {r.chosen.seed}): "
                     f"models:/{r.name}/{r.version}")
    last = f"models:/{registered[-1].name}/{registered[-1].version}"
    # This environment's own commands: `mlflow models serve` starts `uvicorn`, which it finds on the PATH only
    lines.append(f"load: {env} {shlex.quote(sys.executable)} -m distributed_asac.predict {last} IMAGE...")
    lines.append(f"serve: PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH {env} mlflow models serve -m {last} "
                 "--env-manager local -h 127.0.0.1 -p 5001")
    return "\n".join(lines)
