"""The comparison `make demo` prints: every row once per seed, then means with intervals and paired verdicts.

    <output_dir>/<experiment>/<timestamp>/
      config.yaml, results.json, table.md, paired.png    the comparison (results.json: per seed and aggregate)
      seed_<s>/                                           one pipeline run per seed (base, probe, each row)

For each seed: stages 1–2, then every row fine-tuned from that seed's base with the same random state
(`pipeline.run`). MLflow: one parent run per invocation (tag `stage=comparison`) holding the aggregate
metrics, the table and the plot, with the table and verdicts as its description and as sortable MLflow tables;
every per-seed, per-row run is nested under it, named `<row> · seed <s>`.

`resume=latest` (or a comparison folder) continues a killed comparison: finished seeds are read back from
their `seed_<s>/results.json`, the unfinished one continues where it stopped (pipeline.run), the rest run.

Layout: seeds run one after another in this process (the default), or with `parallel=N` N at a time, each
in a process of its own at torch.get_num_threads() // N threads (benchmarks/bench_layout.py measures both).
Every seed's run is the same function on the same config either way; at equal threads per run the numbers
are identical (tests/test_comparison.py), while a different thread count changes float rounding as any
change of hardware does.
"""

from __future__ import annotations

import csv
import ctypes
import dataclasses
import json
import math
import multiprocessing
import shutil
import signal
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from .config import Config
from .data.build import build_splits
from .errors import UserError, interrupted_in
from .logs import setup_logging
from .metrics import COLUMNS, HEADLINE
from .mlflow_models import Chosen, check_before_run, closing_lines, register
from .pipeline import check_run, new_run_dir, run
from .report import format_paired, format_table, format_verdicts, plot_paired, verdict_line
from .resume import INCOMPLETE, STATE, RunState, find_run, mark_complete, mark_incomplete, run_lock
from .rows import in_table_order, row_name
from .runtime import make_accelerator, on_main_process
from .stats import Interval, paired_bootstrap, paired_difference, t_interval
from .tracking import Tracker

REFERENCES = ("base", "plain")  # every row is compared with the base model and with plain fine-tuning


@dataclasses.dataclass
class ComparisonOutput:
    run_dir: Path
    seeds: list[int]
    per_seed: dict[int, dict[str, dict]]  # seed → row → test report
    aggregate: dict[str, dict[str, Interval]]  # row → metric → mean over seeds with its interval
    paired: list[dict]  # {row, reference, metric, interval (the difference), per_seed}


def _rows(per_seed: dict[int, dict[str, dict]]) -> list[str]:
    """The rows every seed produced (the probe is not a target classifier)."""
    common = set.intersection(*(set(results) - {"probe"} for results in per_seed.values()))
    return in_table_order(common)


def aggregate(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict[str, Interval]]:
    """row → metric → the mean over seeds with its 95% t-interval (`stats.t_interval`), for each table column
    (metrics.COLUMNS) that every seed reports."""
    runs = list(per_seed.values())
    return {row: {c.name: t_interval([results[row][c.name] for results in runs])
                  for c in COLUMNS if all(c.name in results[row] for results in runs)}
            for row in _rows(per_seed)}


def _predictions(path: Path) -> dict[str, torch.Tensor]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return {column: torch.tensor([int(r[column]) for r in rows]) for column in ("y", "a", "y_hat")}


def paired(per_seed: dict[int, dict[str, dict]], run_dir: Path) -> list[dict]:
    """Each row against each reference, metric by metric. Two or more seeds: the t-interval of the per-seed
    differences. One seed: the paired bootstrap over the test images (both models' predictions.csv)."""
    seeds, out = list(per_seed), []
    for reference in (r for r in REFERENCES if r in _rows(per_seed)):
        for row in (r for r in _rows(per_seed) if r != reference and r not in REFERENCES[:REFERENCES.index(reference)]):
            if len(seeds) >= 2:
                intervals = {m: paired_difference([per_seed[s][row][m] for s in seeds],
                                                  [per_seed[s][reference][m] for s in seeds]) for m in HEADLINE}
            else:
                folder = run_dir / f"seed_{seeds[0]}"
                ours, theirs = _predictions(folder / row / "predictions.csv"), _predictions(folder / reference / "predictions.csv")
                intervals = paired_bootstrap(ours["y"], ours["a"], ours["y_hat"], theirs["y_hat"])
            for metric, interval in intervals.items():
                out.append({"row": row, "reference": reference, "metric": metric, "interval": interval,
                            "per_seed": [per_seed[s][row][metric] - per_seed[s][reference][metric] for s in seeds]})
    return out


def seed_label(seed: int) -> str:
    """What tells a seed's MLflow runs apart under the comparison's parent run: `asac_fgsm · seed 1`."""
    return f"seed {seed}"


def _describe(seeds: list[int]) -> str:
    if len(seeds) >= 2:
        return (f"mean over {len(seeds)} seeds ({', '.join(map(str, seeds))}) ± the half-width of its 95% "
                "Student-t interval; differences paired by seed (same base, same test images)")
    return (f"one seed ({seeds[0]}): values with the half-width of their 95% percentile bootstrap over test "
            "images; differences by the paired bootstrap (training noise NOT covered: use several seeds)")


def write_comparison(out: ComparisonOutput, cfg: Config, tracker: Tracker) -> str:
    """results.json, table.md and paired.png of the comparison, logged on the parent run; returns the text."""
    single = len(out.seeds) == 1
    if single:  # one seed: the bootstrap over test images is the only interval there is
        (results,) = out.per_seed.values()
        cells = {row: {m: Interval(results[row][m], *results[row]["ci95_bootstrap"][m], results[row]["n"],
                                   "bootstrap over test images") if m in HEADLINE else
                       Interval(results[row][m], math.nan, math.nan, 1, "t over seeds")
                       for m in out.aggregate[row]} for row in out.aggregate}
    else:
        cells = out.aggregate
    text = "\n\n".join([format_table(cells, cfg.data.target), format_paired(out.paired),
                        f"Intervals: {_describe(out.seeds)}."])
    summary = {
        "seeds": out.seeds,
        "interval": _describe(out.seeds),
        "per_seed": {str(s): results for s, results in out.per_seed.items()},
        "aggregate": {row: {m: i.to_dict() for m, i in metrics.items()} for row, metrics in out.aggregate.items()},
        "paired": [{**p, "interval": p["interval"].to_dict(), "verdict": p["interval"].verdict()} for p in out.paired],
    }
    (out.run_dir / "results.json").write_text(json.dumps(summary, indent=2, allow_nan=True))
    (out.run_dir / "table.md").write_text(text + "\n")
    plot_paired(out.paired, out.run_dir / "paired.png", _describe(out.seeds))
    for row, metrics in out.aggregate.items():
        tracker.log_metrics({f"{row}_{m}_mean": i.estimate for m, i in metrics.items()})
        tracker.log_metrics({f"{row}_{m}_ci95_halfwidth": i.half_width for m, i in metrics.items()})
    for p in out.paired:
        tracker.log_metrics({f"{p['row']}_minus_{p['reference']}_{p['metric']}": p["interval"].estimate})
    for name in ("results.json", "table.md", "paired.png", "config.yaml"):
        tracker.log_artifact(out.run_dir / name)
    tracker.log_table(_table_rows(out.aggregate), "table.json")
    tracker.log_table(_verdict_rows(out.paired), "verdicts.json")
    tracker.describe(_note(text, out), "the artifact table.md")
    for seed in out.seeds:  # each seed's robustness curves, beside the summary
        curves = out.run_dir / f"seed_{seed}" / "robustness.png"
        if curves.is_file():
            tracker.log_artifact(curves, f"seed_{seed}")
    return text


def _note(text: str, out: ComparisonOutput) -> str:
    """The parent run's description: the verdicts first (the UI shows the first lines until "Show more"), then
    the printed table and verdicts, and where the rest is."""
    seeds = out.seeds
    return (f"**Comparison over {len(seeds)} seed{'s' * (len(seeds) > 1)} ({', '.join(map(str, seeds))})**, "
            "paired differences with their 95% intervals:\n\n"
            f"{format_verdicts(out.paired)}\n\n{text}\n\nEvery row's models are the runs nested below, named "
            "`<row> · seed <s>`. Artifacts: `table.md`, `results.json` (every number), `paired.png` (forest "
            "plot); `table.json` and `verdicts.json` hold the tables, sortable.")


def _table_rows(aggregate: dict[str, dict[str, Interval]]) -> list[dict]:
    """One line per row and metric of the table: the mean over seeds and its 95% interval."""
    return [{"row": row, "metric": metric, "mean": i.estimate, "ci95_low": i.low, "ci95_high": i.high, "n": i.n}
            for row, metrics in aggregate.items() for metric, i in metrics.items()]


def _verdict_rows(paired: list[dict]) -> list[dict]:
    """One line per paired difference: row − reference on a metric, its 95% interval and verdict."""
    return [{"row": p["row"], "reference": p["reference"], "metric": p["metric"], "difference": p["interval"].estimate,
             "ci95_low": p["interval"].low, "ci95_high": p["interval"].high, "verdict": p["interval"].verdict()}
            for p in paired]


def compare(cfg: Config, variants: Optional[list[dict]] = None,
            accelerator: Optional[Accelerator] = None, parallel: int = 1) -> ComparisonOutput:
    """The whole comparison once per seed of `cfg.seeds` (or `cfg.seed`), then its summary and verdicts;
    `parallel` seeds at a time (see Layout above)."""
    accelerator = accelerator or make_accelerator()
    if parallel > 1 and accelerator.num_processes > 1:
        raise UserError("--parallel-seeds runs each seed in a process of its own, which a multi-process launch "
                        "cannot do; use one of the two")
    seeds = list(cfg.seeds or [cfg.seed])
    rows = [*([] if cfg.base_checkpoint else ["base"]),
            *(row_name(dataclasses.replace(cfg.finetune, **overrides)) for overrides in variants or [{}])]
    on_main_process(accelerator, lambda: check_before_run(cfg, rows, len(seeds)))  # before the data is generated
    # Before the comparison's folder and parent run exist, what the finetune command checks before its own: an
    # unreachable tracking server once took minutes and a traceback here, and left an INCOMPLETE folder behind. The
    # seeds share the data (no split depends on `seed`), so one check covers every seed's run.
    check_run(dataclasses.replace(cfg, resume=None), variants, accelerator)
    resumed = bool(cfg.resume)
    run_dir = find_run(cfg, "comparison") if resumed else new_run_dir(cfg, accelerator)
    cfg = dataclasses.replace(cfg, resume=None)
    with run_lock(run_dir, accelerator), interrupted_in(run_dir):  # one process at a time in a run folder
        if resumed:
            state = RunState.load(run_dir, "comparison", variants, accelerator)
            if accelerator.is_main_process:
                mark_incomplete(run_dir)  # the marker names this process now
        else:
            state = RunState.create(run_dir, "comparison", variants, accelerator)
        return _compare_seeds(cfg, seeds, variants, accelerator, parallel, run_dir, state)


def _compare_seeds(cfg: Config, seeds: list[int], variants: Optional[list[dict]], accelerator: Accelerator,
                   parallel: int, run_dir: Path, state: RunState) -> ComparisonOutput:
    """Every seed still to run (finished seeds are read back), then the summary; marks the comparison complete."""
    tags = {"run_dir": str(run_dir), "stage": "comparison", "seeds": ",".join(map(str, seeds))}
    with Tracker(cfg, "comparison", accelerator.is_main_process, tags, state.run_id("comparison")) as tracker:
        state.record_run("comparison", tracker.run_id)
        per_seed, pending = {}, []  # pending: (seed, resume) of the seeds still to run
        for seed in seeds:
            folder = run_dir / f"seed_{seed}"
            status = [_seed_status(folder) if accelerator.is_main_process else None]
            broadcast_object_list(status)  # the main process's view: ranks must agree
            if status[0] == "finished":  # the position in the seed list: finished seeds are not run again
                per_seed[seed] = json.loads((folder / "results.json").read_text())
            else:
                pending.append((seed, status[0] == "unfinished"))
        if parallel > 1 and len(pending) > 1:
            per_seed.update(_run_at_once(cfg, variants, tracker.run_id, run_dir, pending, parallel, accelerator))
        else:
            for seed, resume in pending:
                if accelerator.is_main_process:
                    print(f"\n=== seed {seed} ({seeds.index(seed) + 1} of {len(seeds)}) ===", flush=True)
                out = run(dataclasses.replace(cfg, seed=seed), variants, accelerator, parent_run_id=tracker.run_id,
                          run_dir=run_dir / f"seed_{seed}", resume=resume, label=seed_label(seed))
                per_seed[seed] = out.results
        per_seed = {seed: per_seed[seed] for seed in seeds}  # in seed order, whichever finished first
        result = ComparisonOutput(run_dir, seeds, per_seed, aggregate(per_seed), [])
        if accelerator.is_main_process:
            result.paired = paired(per_seed, run_dir)
            text = write_comparison(result, cfg, tracker)
            print(f"\n{text}\n\nresults: {run_dir}/results.json  (MLflow experiment {cfg.experiment!r}, "
                  f"parent run {tracker.run_id})")
            if tracker.active:
                answer, runs = tracker.links()
                print(f"MLflow UI (docs/mlflow.md): the answer {answer}\n  every run by name {runs}")
            # A registry that fails now leaves the folder unfinished: resuming it registers what is still missing
            registered = register(cfg, chosen_models(result, cfg), f"comparison {run_dir} (MLflow run {tracker.run_id})")
            if registered:
                print(closing_lines(cfg, registered))
            mark_complete(run_dir)
    accelerator.wait_for_everyone()
    return result


def chosen_models(out: ComparisonOutput, cfg: Config) -> list[Chosen]:
    """The model of each row and seed that the run chose, with the row's verdicts: today the checkpoint each
    model's run ends with (the base: stage 1's epoch with the best valid ACC, the one stage 1 keeps; a fine-tuned
    row: the epoch finetune.select kept)."""
    def rule(row: str, report: dict) -> str:
        if row == "base":
            return f"stage 1's epoch with the best valid ACC (of {cfg.base.epochs})"
        epoch = report.get("selected_epoch")
        return f"finetune.select={cfg.finetune.select}" + (f" (epoch {epoch} of {cfg.finetune.epochs})" if epoch else "")

    verdicts = {row: {reference: line for reference in REFERENCES if (line := verdict_line(out.paired, row, reference))}
                for row in out.aggregate}
    return [Chosen(row, seed, out.run_dir / f"seed_{seed}" / row, rule(row, out.per_seed[seed][row]), verdicts[row])
            for row in out.aggregate for seed in out.seeds]


def _run_at_once(cfg: Config, variants: Optional[list[dict]], parent_run_id: Optional[str], run_dir: Path,
                 pending: list[tuple[int, bool]], parallel: int, accelerator: Accelerator) -> dict[int, dict]:
    """Run the pending seeds `parallel` at a time, each in a fresh (spawned) process; seed → its results."""
    build_splits(cfg, accelerator)  # generate the data and build its caches once, before the seeds read them
    threads = max(1, torch.get_num_threads() // parallel)
    context = multiprocessing.get_context("spawn")  # not fork: this process already runs torch's threads
    with ProcessPoolExecutor(min(parallel, len(pending)), mp_context=context, initializer=_die_with_parent) as pool:
        futures = {pool.submit(_run_seed, dataclasses.replace(cfg, seed=seed), variants, parent_run_id,
                               run_dir / f"seed_{seed}", resume, threads): seed for seed, resume in pending}
        return {futures[future]: future.result() for future in as_completed(futures)}


def _die_with_parent() -> None:
    """A seed's process is killed with the comparison's: after a kill -9 no seed writes on behind a resume."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def _run_seed(cfg: Config, variants: Optional[list[dict]], parent_run_id: Optional[str], folder: Path,
              resume: bool, threads: int) -> dict:
    """One seed's pipeline run in its own process, exactly as the one-after-another layout runs it."""
    setup_logging()
    torch.set_num_threads(threads)
    print(f"\n=== seed {cfg.seed} (its own process, {threads} torch thread{'s' * (threads > 1)}) ===", flush=True)
    return run(cfg, variants, make_accelerator(), parent_run_id=parent_run_id, run_dir=folder, resume=resume,
               label=seed_label(cfg.seed)).results


def _seed_status(folder: Path) -> str:
    """new (not begun), unfinished (a pipeline run to resume) or finished (its results.json is final)."""
    if (folder / INCOMPLETE).is_file() and (folder / STATE).is_file():
        return "unfinished"
    if folder.is_dir() and not (folder / INCOMPLETE).is_file() and (folder / "results.json").is_file():
        return "finished"
    if folder.exists():  # killed while its folder was being made, before anything ran: start it afresh
        shutil.rmtree(folder)
    return "new"
