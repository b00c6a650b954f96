"""The three stages end to end, each one MLflow run with its results, predictions and checkpoint.

Run folder: `<output_dir>/<experiment>/<timestamp>/` holding `pretrain/` (stage 0, when it runs: `backbone.safetensors`),
`base/`, `probe/` (stages 1–2) and one folder per fine-tuned model, each with `results.json`, `predictions.csv`,
`model.safetensors` and `config.yaml`,
plus the run's merged `results.json` and `table.md`. A new folder per invocation: a failed or repeated run
never overwrites a finished one. `resume=latest` or `resume=<run folder>` continues a killed run in its own
folder and MLflow runs instead, skipping finished stages (resume.py).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import socket
import time
import uuid
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from safetensors.torch import load_file, save_file

from .analysis import analyse, curve_metrics, figure_indices, ig_maps, needs_attacker, probe_warning
from .checkpoint import (PRETRAINED, WEIGHTS, load_base, load_stage_one, save_checkpoint, save_pretrained,
                         stage_one_start, whole_state_dict)
from .config import Config, check_batch_sizes, save_config
from .data.build import build_splits
from .data.datasets import Splits
from .errors import UserError, interrupted_in
from .evaluate import evaluate, write_results
from .failpoints import failpoint
from .mitigations.groups import dataset_groups, group_counts
from .mlflow_models import log_model
from .models import BACKBONES, TwoHeadModel
from .report import format_table, plot_ig_figure, plot_robustness
from .resume import INCOMPLETE, RunState, find_run, mark_complete, mark_incomplete, run_lock
from .rows import MODES, in_table_order, row_name
from .runtime import make_accelerator, on_main_process, seed_everything, zero_stage
from .selection import NEEDS_GROUPS
from .pretrain import check_pretraining, pretrain
from .stage3 import finetune
from .stages import initial_model, train_stage
from .stats import bootstrap_interval
from .tracking import Tracker, check_store, close_killed_runs


def new_run_dir(cfg: Config, accelerator: Accelerator, run_dir: Optional[Path] = None) -> Path:
    """A fresh `<output_dir>/<experiment>/<timestamp>` chosen by the main process and shared with all ranks
    (or `run_dir` itself when the caller chose it: a comparison's per-seed folder), holding the resolved
    config and an INCOMPLETE marker until its run finishes (resume.py)."""
    if run_dir is None:
        name = [time.strftime("%Y%m%d-%H%M%S")]
        broadcast_object_list(name)
        base = Path(cfg.output_dir) / cfg.experiment
        run_dir, suffix = base / name[0], 1
        while accelerator.is_main_process and run_dir.exists():  # two runs started within one second
            suffix += 1
            run_dir = base / f"{name[0]}-{suffix}"
        path = [str(run_dir)]
        broadcast_object_list(path)
        run_dir = Path(path[0])
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True)
        mark_incomplete(run_dir)
        save_config(cfg, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    return run_dir


def preflight(cfg: Config, accelerator: Accelerator) -> None:
    """Refuse, before any data or training, an output_dir that cannot hold run folders and a tracking store
    that cannot be used (then mark KILLED the runs of this experiment whose process was killed). The main
    process checks; every rank raises the same one-line error."""
    def check() -> None:
        for path in (Path(cfg.output_dir) / cfg.experiment, *(Path(cfg.output_dir) / cfg.experiment).parents):
            if path.exists():  # the nearest existing path on the way must be a folder
                if not path.is_dir():
                    raise UserError(f"config key 'output_dir': {str(path)!r} is an existing file, not a folder; "
                                    "set output_dir to a folder (it is created if missing)")
                break
        check_store(cfg)
        close_killed_runs(cfg, INCOMPLETE)

    on_main_process(accelerator, check)
    if accelerator.num_processes > 1:
        check_shared_folders(cfg, accelerator)


def check_shared_folders(cfg: Config, accelerator: Accelerator) -> None:
    """Refuse a run whose ranks do not all see the same `output_dir` (and `data.cache_dir`): rank 0 writes a
    token file into each, every rank reads it back. Run folders, resume states, sweep records and the pixel
    cache are written by the main process and read by all; on node-local folders each node would otherwise
    build its own cache and a resumed run would find nothing (docs/distributed.md, Shared storage)."""
    folders = {"output_dir": Path(cfg.output_dir)}
    if cfg.data.cache_dir:
        folders["data.cache_dir"] = Path(cfg.data.cache_dir)
    shared = [(uuid.uuid4().hex, {key: str(folder.resolve()) for key, folder in folders.items()})
              if accelerator.is_main_process else None]
    broadcast_object_list(shared)
    token, resolved = shared[0]
    name = f".shared-check-{token}"
    if accelerator.is_main_process:
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(token)
    accelerator.wait_for_everyone()

    def sees(folder: Path) -> bool:
        try:
            return (folder / name).read_text() == token
        except OSError:
            return False

    views = gather_object([(accelerator.process_index, socket.gethostname(), [sees(f) for f in folders.values()])])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for folder in folders.values():
            (folder / name).unlink(missing_ok=True)
    for j, (key, folder) in enumerate(folders.items()):
        blind = [(rank, host) for rank, host, seen in views if not seen[j]]
        if blind:
            hosts = sorted({host for _, host in blind})
            raise UserError(
                f"config key {key!r}: {str(folder)!r} ({resolved[key]} on rank 0) is not the same folder on every "
                f"node: rank(s) {[rank for rank, _ in blind]} on {', '.join(hosts)} cannot read the file rank 0 wrote "
                f"there; set {key} to an absolute path on a file system that every node mounts at the same path "
                "(NFS, Lustre, ...)")


def check_splits(cfg: Config, splits: Splits) -> None:
    """Refuse splits on which a run means nothing, before any training: a train split with one target label or
    one protected group (M or C would learn a constant) and a test split missing a (target, protected) group
    (the fairness metrics compare the groups: every one of them would be n/a)."""
    for key, labels in (("data.target", splits.train.targets), ("data.protected", splits.train.protected_labels)):
        if len(labels.unique()) < 2:
            name = cfg.data.target if key == "data.target" else cfg.data.protected
            raise UserError(f"the train split ({len(labels)} images) has only {name}={int(labels[0])} ({key}): a "
                            f"classifier of one class learns nothing; use a dataset where {name} takes both values, "
                            f"or set {key} to another attribute")
    counts, shown = group_counts(dataset_groups(splits.test))
    if min(counts) == 0:
        raise UserError(f"the test split lacks a (target, protected) group ((y, a) = ({cfg.data.target}, "
                        f"{cfg.data.protected}): {shown}), so every fairness metric would be n/a; use a larger or "
                        "less biased test split, or other data.target / data.protected")
    check_selection(cfg, splits.valid)


def check_selection(cfg: Config, valid) -> None:
    """Refuse a selection rule that scores each epoch by its groups (selection.NEEDS_GROUPS) on a valid split that
    lacks one: every epoch's score would be undefined."""
    if cfg.finetune.select in NEEDS_GROUPS:
        counts, shown = group_counts(dataset_groups(valid))
        if min(counts) == 0:
            raise UserError(f"finetune.select={cfg.finetune.select} needs every (target, protected) group in the valid "
                            f"split to score an epoch, and it has {shown}; use finetune.select=avg_valid (or last), or "
                            "a valid split with every group")


def check_replicas(model: TwoHeadModel, accelerator: Accelerator) -> dict[str, object]:
    """Gather a digest of every rank's whole parameters (gathered first under ZeRO-3) and fail if they differ:
    ranks that never synchronised (a CPU launch without ACCELERATE_USE_CPU, say) would otherwise pass for a
    distributed run."""
    state = whole_state_dict(model)
    digest = hashlib.sha256()
    for name, _ in model.named_parameters():
        digest.update(state[name].numpy().tobytes())
    digests = gather_object([digest.hexdigest()]) if accelerator.num_processes > 1 else [digest.hexdigest()]
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks ended with different parameters ({len(set(digests))} distinct): not synchronised")
    return {"world_size": accelerator.num_processes, "distributed_type": accelerator.distributed_type.value,
            "zero_stage": zero_stage(accelerator), "parameter_digests": digests}


IG_FIGURE = "ig_figure.png"  # in the run folder: the paper's Fig. 3 for the models of the run so far
IG_MAPS = "ig_maps.safetensors"  # in a model's folder: its |IG| on the figure's images


def write_ig_figure(model: TwoHeadModel, folder: Path, test, cfg: Config, device: torch.device) -> Path:
    """Save this model's |IG| on the figure's fixed test images (two per (target, protected) group), then draw
    the run's figure from every model of the run that has its maps (the base, then the rows in table order)."""
    indices = figure_indices(test)
    save_file({"maps": ig_maps(model, test, indices, cfg.analysis.ig_steps, device)}, str(folder / IG_MAPS))
    run_dir = folder.parent
    done = {p.parent.name for p in run_dir.glob(f"*/{IG_MAPS}")}
    names = in_table_order(done)
    items = [test[i] for i in indices]
    plot_ig_figure(torch.stack([item[0] for item in items]), [(int(item[1]), int(item[2])) for item in items],
                   torch.stack([test.mouth_box(i) for i in indices]),
                   {n: load_file(str(run_dir / n / IG_MAPS))["maps"] for n in names}, run_dir / IG_FIGURE)
    return run_dir / IG_FIGURE


def finish_model(name: str, model: TwoHeadModel, cfg: Config, splits: Splits, accelerator: Accelerator,
                 tracker: Tracker, folder: Path, attacker: Optional[TwoHeadModel],
                 extra: Optional[dict] = None) -> dict[str, object]:
    """Evaluate on test (and twins), analyse (against `attacker`'s C: see `analysis.analyse`), write results.json
    (with `extra`, e.g. the fine-tune's summary), predictions.csv and the checkpoint, log all.

    `model` must be whole on every rank (train_stage and finetune return plain modules, also after ZeRO-3):
    the analysis and the checkpoint are the main process's alone, and a ZeRO-3 forward or gather there
    would wait forever for the other ranks."""
    evaluation = evaluate(accelerator, model, splits.test, cfg.finetune.batch_size, twins=splits.twins,
                          num_workers=cfg.data.num_workers)
    report = {**evaluation.report(), **(extra or {})}
    if accelerator.is_main_process:  # 95% percentile bootstrap over the test images (stats.py)
        y, a, y_hat = (torch.tensor([row[i] for row in evaluation.rows]) for i in (1, 2, 3))
        report["ci95_bootstrap"] = {name: [interval.low, interval.high]
                                    for name, interval in bootstrap_interval(y, a, y_hat).items()}
    replicas = check_replicas(model, accelerator)
    tracker.log_metrics({f"test_{k}": v for k, v in report.items()})
    tracker.log_metrics({"data_skipped_images": splits.num_skipped()})
    tracker.log_params({"world_size": replicas["world_size"]})
    if accelerator.is_main_process:
        analysis = analyse(model, attacker, splits.test, cfg.analysis, cfg.finetune.eps, cfg.finetune.batch_size,
                           accelerator.device)
        folder.mkdir(parents=True, exist_ok=True)
        if name != "probe" and cfg.analysis.ig_images > 0 and hasattr(splits.test, "mouth_box"):  # probe's M is base's
            tracker.log_artifact(write_ig_figure(model, folder, splits.test, cfg, accelerator.device))
            analysis["ig_figure"] = IG_FIGURE  # relative to the run folder
        report.update(analysis)
        files = write_results(folder, name, evaluation,
                              extra={**analysis, **(extra or {}), "ci95_bootstrap": report["ci95_bootstrap"]})
        (folder / "replicas.json").write_text(json.dumps(replicas, indent=2))
        save_checkpoint(whole_state_dict(model), cfg, folder, name)
        if name != "probe":  # the probe's M is the base's; what it adds, C, is no model to ship
            tracker.with_client(lambda client, run_id: log_model(client, run_id, folder, name, cfg))
        tracker.log_metrics(curve_metrics(analysis))
        tracker.log_metrics({k: v for k, v in analysis.items() if isinstance(v, float)})
        for path in (*files, folder / "model.safetensors", folder / "config.yaml"):
            tracker.log_artifact(path)
    accelerator.wait_for_everyone()
    return report


def run_name(model: str, label: Optional[str]) -> str:
    """A model's MLflow run name: the model, and what tells it apart from its siblings under one parent run
    (`asac_fgsm · seed 1` in a comparison)."""
    return f"{model} · {label}" if label else model


def train_stage_zero(cfg: Config, accelerator: Accelerator, run_dir: Path, tags: dict[str, str], state: RunState,
                     label: Optional[str]) -> Path:
    """Stage 0 (pretrain.py), unless a killed attempt finished it: `run_dir/pretrain/` gets θ's file, its config and
    its report (the accuracy per attribute on its set's test split), and it is an MLflow run of its own. Returns the
    file, which stage 1 starts from."""
    folder = run_dir / "pretrain"
    if state.finished("pretrain") is None:
        with Tracker(cfg, run_name("pretrain", label), accelerator.is_main_process, {**tags, "stage": "pretrain"},
                     state.run_id("pretrain")) as tracker:
            state.record_run("pretrain", tracker.run_id)
            backbone, report = pretrain(cfg, accelerator, tracker, folder / "state")
            tracker.log_metrics({f"test_{k}": v for k, v in report.items()})
            if accelerator.is_main_process:
                path = save_pretrained(backbone, cfg, folder)
                (folder / "results.json").write_text(json.dumps({"pretrain": report}, indent=2, allow_nan=True))
                for artifact in (path, folder / "results.json", folder / "config.yaml"):
                    tracker.log_artifact(artifact)
            accelerator.wait_for_everyone()
        state.finish("pretrain", report, accelerator)
        failpoint("pipeline.between_stages", finished="pretrain", seed=cfg.seed)
    return folder / PRETRAINED


def train_base_and_probe(cfg: Config, splits: Splits, accelerator: Accelerator, run_dir: Path,
                         tags: dict[str, str], state: RunState, label: Optional[str] = None,
                         until: Optional[str] = None) -> tuple[Optional[TwoHeadModel], dict[str, dict]]:
    """Stages 0 (with pretrain.epochs > 0), 1 (unless `cfg.stage1_checkpoint` gives its M) and 2 from scratch (or
    from where a killed attempt left them); the model of `run_dir/probe` is the base checkpoint for stage 3. Stage 1
    starts from stage 0's θ as from `model.weights` (so do an independent C's own backbone, and the configs saved
    beside the checkpoints, which name the file). The model's initialisation and each stage after it start from the
    random state `cfg.seed`, so a run resumed between stages draws the same numbers as one that was not.
    `label` goes into the run names (`run_name`); `until` ("pretrain" or "base") stops after that stage."""
    if cfg.pretrain.epochs > 0:
        weights = train_stage_zero(cfg, accelerator, run_dir, tags, state, label)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=str(weights)))
    if until == "pretrain":
        return None, {}
    model, results = initial_model(cfg, accelerator), {}
    if cfg.stage1_checkpoint:
        results["base"] = load_stage_one(cfg, model)
    for stage in ("base", "probe"):
        if stage in results:  # stage 1's M loaded from stage1_checkpoint
            continue
        if state.finished(stage) is not None:  # a resumed run: this stage's model and report are on disk
            results[stage] = state.finished(stage)
            model.load_state_dict(load_file(str(run_dir / stage / WEIGHTS)))
            continue
        if stage != "base":
            seed_everything(cfg.seed, accelerator)
        with Tracker(cfg, run_name(stage, label), accelerator.is_main_process, {**tags, "stage": stage},
                     state.run_id(stage)) as tracker:
            state.record_run(stage, tracker.run_id)
            model = train_stage(stage, model, splits, cfg, accelerator, tracker, run_dir / stage / "state")
            # The base's C is untrained until stage 2: the base has no attacker yet; the probe attacks itself
            attacker = model if stage == "probe" else None
            results[stage] = finish_model(stage, model, cfg, splits, accelerator, tracker, run_dir / stage, attacker)
        state.finish(stage, results[stage], accelerator)
        failpoint("pipeline.between_stages", finished=stage, seed=cfg.seed)
        if stage == until:
            return model, results
    # The probe's M is the base's M, and its C is the one stage 3 attacks: its curves, mechanism numbers and accuracy
    # are the base row's (the base's own results.json and MLflow run, written before the probe existed, lack them or
    # hold an untrained C's).
    results["base"] = {**results["base"], **{k: v for k, v in results["probe"].items() if needs_attacker(k)}}
    return model, results


def run_finetune(cfg: Config, base: TwoHeadModel, splits: Splits, accelerator: Accelerator, run_dir: Path,
                 generator: torch.Generator, tags: dict[str, str], state: RunState,
                 label: Optional[str] = None) -> tuple[str, dict[str, object]]:
    """Stage 3 on a copy of `base` per `cfg.finetune`, evaluated and logged as its own MLflow run."""
    name = row_name(cfg.finetune)
    model = copy.deepcopy(base).to(accelerator.device)
    tags = {**tags, "stage": "finetune", "mode": cfg.finetune.mode}
    with Tracker(cfg, run_name(name, label), accelerator.is_main_process, tags, state.run_id(name)) as tracker:
        state.record_run(name, tracker.run_id)
        model, summary = finetune(model, splits.train, splits.valid, cfg, accelerator, tracker, generator,
                                  run_dir / name / "state")
        report = finish_model(name, model, cfg, splits, accelerator, tracker, run_dir / name,
                              base.to(accelerator.device), extra=summary)
    state.finish(name, report, accelerator)
    failpoint("pipeline.between_stages", finished=name, seed=cfg.seed)
    return name, report


def write_summary(run_dir: Path, results: dict[str, dict], cfg: Config) -> str:
    """The run's merged results.json, table.md and robustness.png; returns the table (with, under it, a warning when
    an ASAC row's attacked C reads the protected attribute through the target: `analysis.probe_warning`)."""
    table = format_table(results, cfg.data.target)
    warning = asac_warning(results, cfg)
    if warning:
        logging.getLogger(__name__).warning(warning)
        table += f"\n\n**Warning**: {warning}."
    curves = {name: {k: r[k] for k in ("robustness", "robustness_own_C") if k in r}
              for name, r in results.items() if "robustness" in r and name != "probe"}
    if curves:
        plot_robustness(curves, run_dir / "robustness.png")
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, allow_nan=True))
    (run_dir / "table.md").write_text(table + "\n")
    return table


def asac_warning(results: dict[str, dict], cfg: Config) -> Optional[str]:
    """`analysis.probe_warning` of the C that the run's ASAC rows attacked (rows with an attack success rate): the
    base's, from this run's results or the base checkpoint's probe/results.json. None without an ASAC row."""
    if not any("attack_success_rate" in report for report in results.values()):
        return None
    base = results.get("base")
    if base is None and cfg.base_checkpoint:
        path = Path(cfg.base_checkpoint) / "results.json"
        base = json.loads(path.read_text()).get("probe") if path.is_file() else None  # {"probe": its report}
    return probe_warning(base or {}, cfg.data.target, cfg.data.protected)


@dataclasses.dataclass
class RunOutput:
    run_dir: Path  # <output_dir>/<experiment>/<timestamp>
    results: dict[str, dict]  # model name → test report (DEO, DEOp, DDP, ACC, ...)


def run(cfg: Config, variants: Optional[list[dict]] = None, accelerator: Optional[Accelerator] = None,
        parent_run_id: Optional[str] = None, run_dir: Optional[Path] = None, resume: bool = False,
        label: Optional[str] = None, until: Optional[str] = None) -> RunOutput:
    """Stages 1–2 (or the base checkpoint), then stage 3 once per variant of `cfg.finetune` (default: the
    config's own), all on one Accelerator. Every model is one MLflow run, nested under `parent_run_id` if
    given (a sweep's or a comparison's parent run) and named after the model and `label`, what tells these
    models apart from the others under that parent (`run_name`). Each fine-tune starts from the same base
    weights AND the same random state (`cfg.seed`), so rows differ only by their method: paired comparisons
    are fair.

    `cfg.resume` (or `resume=True` with the `run_dir` of an unfinished run, as a resumed comparison passes)
    continues that run in its folder and MLflow runs: finished stages are skipped, an unfinished one
    continues from its last epoch end, and the results equal an uninterrupted run's.

    `until` ("pretrain" or "base", with no variants) ends the run after that stage: a sweep's base cache trains
    stages 0 and 1 once each for every trial they define (tune/trials.py)."""
    accelerator = accelerator or make_accelerator()
    if cfg.resume and run_dir is None:
        run_dir, resume = find_run(cfg, "pipeline"), True
    cfg = dataclasses.replace(cfg, resume=None)  # what the run's files record: the run's own config
    base, splits = check_run(cfg, variants, accelerator)
    if not resume:
        run_dir = new_run_dir(cfg, accelerator, run_dir)
    with run_lock(run_dir, accelerator), interrupted_in(run_dir):  # one process at a time in a run folder
        if resume:
            state = RunState.load(run_dir, "pipeline", variants, accelerator)
            if accelerator.is_main_process:
                mark_incomplete(run_dir)  # the marker names this process now
                print(f"resuming {run_dir} (finished: {', '.join(state.data['finished']) or 'nothing yet'})",
                      flush=True)
        else:
            state = RunState.create(run_dir, "pipeline", variants, accelerator)
        results = train_rows(cfg, variants, base, splits, accelerator, run_dir, state, parent_run_id, label, until)
    return RunOutput(run_dir, results)


def check_run(cfg: Config, variants: Optional[list[dict]],
              accelerator: Accelerator) -> tuple[Optional[TwoHeadModel], Splits]:
    """Everything a run is refused for before its folder or any MLflow run exists: `preflight`, the base checkpoint
    and model weights, the splits (`check_splits`), the batch sizes and what each row of `variants` needs.
    Returns the base model (None: stages 1–2 will train it) and the splits; the random state is `cfg.seed`'s."""
    preflight(cfg, accelerator)
    seed_everything(cfg.seed, accelerator)
    base = load_base(cfg) if cfg.base_checkpoint else None  # before the data: a bad checkpoint costs nothing
    if cfg.stage1_checkpoint:
        load_stage_one(cfg)
    if base is None and cfg.model.weights:  # a bad weights file: refused now, not once the run folder exists
        with torch.random.fork_rng(devices=[]):  # the throwaway network must not move the run's random state
            BACKBONES.get(cfg.model.backbone)(cfg.model.weights)
    splits = build_splits(cfg, accelerator)
    check_splits(cfg, splits)
    if base is None and cfg.pretrain.epochs > 0:
        check_pretraining(cfg, accelerator)
    check_batch_sizes(cfg, len(splits.train), accelerator.num_processes,
                      ("finetune",) if base is not None else ("base", "probe", "finetune"))
    for overrides in variants or [{}]:  # what a row cannot run on (no generator file, no train twins) stops it now
        row = MODES.get(overrides.get("mode", cfg.finetune.mode))
        if row.check is not None:
            row.check(cfg)
        if row.check_splits is not None:  # e.g. a valid split too small to balance (dfr)
            row.check_splits(cfg, splits)
    return base, splits


def train_rows(cfg: Config, variants: Optional[list[dict]], base: Optional[TwoHeadModel], splits: Splits,
               accelerator: Accelerator, run_dir: Path, state: RunState, parent_run_id: Optional[str],
               label: Optional[str], until: Optional[str] = None) -> dict[str, dict]:
    """Stages 0–2 (unless `base` is given), then stage 3 once per variant (none after `until`), then the run's
    summary: the run folder is complete. Returns model name → test report."""
    tags = {"run_dir": str(run_dir)}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    if base is not None:
        results = {}
    else:
        base, results = train_base_and_probe(cfg, splits, accelerator, run_dir, tags, state, label, until)
    rows_cfg = stage_one_start(cfg, run_dir)
    for overrides in [] if until else variants or [{}]:
        variant = dataclasses.replace(rows_cfg, finetune=dataclasses.replace(cfg.finetune, **overrides))
        if variant.finetune.mode == "base" and "base" in results:
            continue  # the base row is already evaluated
        name = row_name(variant.finetune)
        if state.finished(name) is not None:
            results[name] = state.finished(name)
            continue
        generator = seed_everything(cfg.seed, accelerator)  # data order, attack starts, curriculum shuffles
        name, report = run_finetune(variant, base, splits, accelerator, run_dir, generator, tags, state, label)
        results[name] = report
    if accelerator.is_main_process:
        table = write_summary(run_dir, results, cfg)
        mark_complete(run_dir)
        print(f"\n{table}\n\nresults: {run_dir}/results.json  (MLflow experiment {cfg.experiment!r})")
    accelerator.wait_for_everyone()
    return results
