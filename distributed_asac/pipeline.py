"""The three stages end to end, each one MLflow run with its results, predictions and checkpoint.

Run folder: `<output_dir>/<experiment>/<timestamp>/` holding `base/`, `probe/` (stages 1–2) and one folder
per fine-tuned model, each with `results.json`, `predictions.csv`, `model.safetensors` and `config.yaml`,
plus the run's merged `results.json` and `table.md`. A new folder per invocation: a failed or repeated run
never overwrites a finished one. `resume=latest` or `resume=<run folder>` continues a killed run in its own
folder and MLflow runs instead, skipping finished stages (resume.py).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from safetensors.torch import load_file

from .analysis import analyse
from .checkpoint import WEIGHTS, load_checkpoint, save_checkpoint
from .config import Config, save_config
from .data.build import Splits, build_splits
from .errors import UserError
from .evaluate import evaluate, write_results
from .failpoints import failpoint
from .finetune import finetune, model_name
from .models import TwoHeadModel, create_model
from .report import format_table, plot_robustness
from .resume import RunState, find_run, mark_complete, mark_incomplete
from .runtime import make_accelerator, seed_everything
from .stats import bootstrap_interval
from .stages import train_stage
from .tracking import Tracker


def new_run_dir(cfg: Config, accelerator: Accelerator, run_dir: Optional[Path] = None) -> Path:
    """A fresh `<output_dir>/<experiment>/<timestamp>` chosen by the main process and shared with all ranks,
    or `run_dir` itself when the caller chose it (a comparison's per-seed folder). It is marked INCOMPLETE
    until its run finishes."""
    if run_dir is not None:
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True)
            save_config(cfg, run_dir / "config.yaml")
            mark_incomplete(run_dir)
        accelerator.wait_for_everyone()
        return run_dir
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
        save_config(cfg, run_dir / "config.yaml")
        mark_incomplete(run_dir)
    accelerator.wait_for_everyone()
    return run_dir


def check_replicas(model: TwoHeadModel, accelerator: Accelerator) -> dict[str, object]:
    """Gather a digest of every rank's parameters and fail if they differ: ranks that never synchronised
    (a CPU launch without ACCELERATE_USE_CPU, say) would otherwise pass for a distributed run."""
    digest = hashlib.sha256()
    for tensor in model.parameters():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    digests = gather_object([digest.hexdigest()]) if accelerator.num_processes > 1 else [digest.hexdigest()]
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks ended with different parameters ({len(set(digests))} distinct): not synchronised")
    return {"world_size": accelerator.num_processes, "distributed_type": accelerator.distributed_type.value,
            "parameter_digests": digests}


def finish_model(name: str, model: TwoHeadModel, cfg: Config, splits: Splits, accelerator: Accelerator,
                 tracker: Tracker, folder: Path, extra: Optional[dict] = None) -> dict[str, object]:
    """Evaluate on test (and twins), analyse, write results.json (with `extra`, e.g. the fine-tune's summary),
    predictions.csv and the checkpoint, log all."""
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
        analysis = analyse(model, splits.test, cfg.analysis, cfg.finetune.batch_size, accelerator.device)
        report.update(analysis)
        files = write_results(folder, name, evaluation,
                              extra={**analysis, **(extra or {}), "ci95_bootstrap": report["ci95_bootstrap"]})
        (folder / "replicas.json").write_text(json.dumps(replicas, indent=2))
        save_checkpoint(model.state_dict(), cfg, folder)
        for point in analysis.get("robustness", []):
            tracker.log_metrics({f"robust_{k}_eps_{point['eps']:g}": v for k, v in point.items() if k != "eps"})
        if "IG_mouth_share" in analysis:
            tracker.log_metrics({k: analysis[k] for k in ("IG_mouth_share", "mouth_area_share")})
        for path in (*files, folder / "model.safetensors", folder / "config.yaml"):
            tracker.log_artifact(path)
    accelerator.wait_for_everyone()
    return report


def train_base_and_probe(cfg: Config, splits: Splits, accelerator: Accelerator, run_dir: Path,
                         tags: dict[str, str], state: RunState) -> tuple[TwoHeadModel, dict[str, dict]]:
    """Stages 1 and 2 from scratch (or from where a killed attempt left them); the model of `run_dir/probe`
    is the base checkpoint for stage 3. The model's initialisation and each stage after it start from the
    random state `cfg.seed`, so a run resumed between stages draws the same numbers as one that was not."""
    seed_everything(cfg.seed, accelerator)
    model = create_model(cfg.model.backbone, cfg.model.weights).to(accelerator.device)
    results = {}
    for stage in ("base", "probe"):
        if state.finished(stage) is not None:  # a resumed run: this stage's model and report are on disk
            results[stage] = state.finished(stage)
            model.load_state_dict(load_file(str(run_dir / stage / WEIGHTS)))
            continue
        if stage != "base":
            seed_everything(cfg.seed, accelerator)
        with Tracker(cfg, stage, accelerator.is_main_process, {**tags, "stage": stage}, state.run_id(stage)) as tracker:
            state.record_run(stage, tracker.run_id)
            model = train_stage(stage, model, splits, cfg, accelerator, tracker, run_dir / stage / "state")
            results[stage] = finish_model(stage, model, cfg, splits, accelerator, tracker, run_dir / stage)
        state.finish(stage, results[stage], accelerator)
        failpoint("pipeline.between_stages", finished=stage, seed=cfg.seed)
    return model, results


def load_base(cfg: Config) -> TwoHeadModel:
    """The model of `cfg.base_checkpoint`, checked to match the config's backbone."""
    model, saved = load_checkpoint(cfg.base_checkpoint)
    if saved.model.backbone != cfg.model.backbone:
        raise UserError(
            f"base_checkpoint {cfg.base_checkpoint!r} holds a {saved.model.backbone} but model.backbone is "
            f"{cfg.model.backbone!r}; set model.backbone={saved.model.backbone} or train a new base"
        )
    return model


def run_finetune(cfg: Config, base: TwoHeadModel, splits: Splits, accelerator: Accelerator, run_dir: Path,
                 generator: torch.Generator, tags: dict[str, str], state: RunState) -> tuple[str, dict[str, object]]:
    """Stage 3 on a copy of `base` per `cfg.finetune`, evaluated and logged as its own MLflow run."""
    name = model_name(cfg.finetune)
    model = copy.deepcopy(base).to(accelerator.device)
    tags = {**tags, "stage": "finetune", "mode": cfg.finetune.mode}
    with Tracker(cfg, name, accelerator.is_main_process, tags, state.run_id(name)) as tracker:
        state.record_run(name, tracker.run_id)
        model, summary = finetune(model, splits.train, splits.valid, cfg, accelerator, tracker, generator,
                                  run_dir / name / "state")
        report = finish_model(name, model, cfg, splits, accelerator, tracker, run_dir / name, extra=summary)
    state.finish(name, report, accelerator)
    failpoint("pipeline.between_stages", finished=name, seed=cfg.seed)
    return name, report


def write_summary(run_dir: Path, results: dict[str, dict], cfg: Config) -> str:
    """The run's merged results.json, table.md and robustness.png; returns the table."""
    table = format_table(results, cfg.data.target)
    curves = {name: r["robustness"] for name, r in results.items() if "robustness" in r and name != "probe"}
    if curves:
        plot_robustness(curves, run_dir / "robustness.png")
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, allow_nan=True))
    (run_dir / "table.md").write_text(table + "\n")
    return table


@dataclasses.dataclass
class RunOutput:
    run_dir: Path  # <output_dir>/<experiment>/<timestamp>
    results: dict[str, dict]  # model name → test report (DEO, DEOp, DDP, ACC, ...)


def run(cfg: Config, variants: Optional[list[dict]] = None, accelerator: Optional[Accelerator] = None,
        parent_run_id: Optional[str] = None, run_dir: Optional[Path] = None, resume: bool = False) -> RunOutput:
    """Stages 1–2 (or the base checkpoint), then stage 3 once per variant of `cfg.finetune` (default: the
    config's own), all on one Accelerator. Every model is one MLflow run, nested under `parent_run_id` if
    given (a sweep's or a comparison's parent run). Each fine-tune starts from the same base weights AND
    the same random state (`cfg.seed`), so rows differ only by their method: paired comparisons are fair.

    `cfg.resume` (or `resume=True` with the `run_dir` of an unfinished run, as a resumed comparison passes)
    continues that run in its folder and MLflow runs: finished stages are skipped, an unfinished one
    continues from its last epoch end, and the results equal an uninterrupted run's."""
    accelerator = accelerator or make_accelerator()
    if cfg.resume and run_dir is None:
        run_dir, resume = find_run(cfg, "pipeline"), True
    cfg = dataclasses.replace(cfg, resume=None)  # what the run's files record: the run's own config
    seed_everything(cfg.seed, accelerator)
    splits = build_splits(cfg, accelerator)
    if resume:
        state = RunState.load(run_dir, "pipeline", variants, accelerator)
        if accelerator.is_main_process:
            print(f"resuming {run_dir} (finished: {', '.join(state.data['finished']) or 'nothing yet'})", flush=True)
    else:
        run_dir = new_run_dir(cfg, accelerator, run_dir)
        state = RunState.create(run_dir, "pipeline", variants, accelerator)
    tags = {"run_dir": str(run_dir)}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    if cfg.base_checkpoint:
        base, results = load_base(cfg), {}
    else:
        base, results = train_base_and_probe(cfg, splits, accelerator, run_dir, tags, state)
    for overrides in variants or [{}]:
        variant = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, **overrides))
        if variant.finetune.mode == "base" and "base" in results:
            continue  # the base row is already evaluated
        name = model_name(variant.finetune)
        if state.finished(name) is not None:
            results[name] = state.finished(name)
            continue
        generator = seed_everything(cfg.seed, accelerator)  # data order, attack starts, curriculum shuffles
        name, report = run_finetune(variant, base, splits, accelerator, run_dir, generator, tags, state)
        results[name] = report
    if accelerator.is_main_process:
        table = write_summary(run_dir, results, cfg)
        mark_complete(run_dir)
        print(f"\n{table}\n\nresults: {run_dir}/results.json  (MLflow experiment {cfg.experiment!r})")
    accelerator.wait_for_everyone()
    return RunOutput(run_dir, results)
