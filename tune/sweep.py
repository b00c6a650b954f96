"""Ray Tune ablation sweeps of ASAC fine-tuning, one MLflow parent run per sweep with a child per trial.

    python tune/sweep.py --config configs/sweeps/smoke.yaml [--address auto|ray://head:10001]
                         [--resume [SWEEP_DIR]] [--retry-failed] [--dry-run] [key=value ...]
    python tune/sweep.py --report <parent run id | sweep folder> [tracking.uri=...]
    (or `python -m tune.sweep ...`, or `asac-sweep ...`: tune/ is a package installed with the project)

The driver reads and validates the sweep file (spec.py: every trial's config is built before Ray starts),
generates the synthetic dataset once, starts Ray, trains each missing base model once (as Ray tasks, before any
trial) and runs the trials with Tune (trials.py), keeps their records and MLflow runs (records.py) and writes
the report (report.py). Exit status: 0 all trials finished, 1 some failed, 2 bad input, 130 (Ctrl-C) or 143 (SIGTERM)
interrupted (the last line is the command that resumes it).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

if not __package__:  # `python tune/sweep.py`: Python put tune/ on the path, not the repository that holds it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed_asac.config import check_given_once, load_config
from distributed_asac.errors import Interrupted, UserError, exit_on_user_error, interrupted_in, module_command
from distributed_asac.locks import locked
from distributed_asac.logs import setup_logging
from distributed_asac.tracking import probe_store, tracking_uri
from tune import records, registered, search, trials
from tune.between import Other
from tune.claims import Claims, parse_claims
from tune.records import TrialRecord, load_records, read_state, status_counts
from tune.report import format_setting, write_report
from tune.search import Choice, choose, describe_space
from tune.spec import Sweep, base_key, load_sweep
from tune.trials import TrialJob


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python tune/sweep.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a sweep file, e.g. configs/sweeps/smoke.yaml")
    parser.add_argument("--address", help="a Ray cluster to join ('auto', head:6379 or ray://head:10001); default: "
                                           "$RAY_ADDRESS if set, else start Ray here")
    parser.add_argument("--shared-store", action="store_true",
                        help="on a cluster: the sqlite tracking store is on a file system every node mounts (else "
                             "a sqlite store is refused there; use an MLflow server)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="SWEEP_DIR",
                        help="continue the latest sweep of this file (or SWEEP_DIR): finished trials are not rerun")
    parser.add_argument("--retry-failed", action="store_true", help="with --resume: run failed trials again too")
    parser.add_argument("--dry-run", action="store_true", help="print the trials and exit")
    parser.add_argument("--seeds", type=_seed_list, metavar="S,S,...",
                        help="run these seeds instead of the file's (e.g. more seeds for a finished study)")
    parser.add_argument("--grids", type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
                        metavar="G,G,...", help="run only these grids of the file, and report the claims their "
                                                "trials measure (e.g. --grids cue,cue_mitigations of claims.yaml)")
    parser.add_argument("--chosen", metavar="SEARCH_DIR",
                        help="run each searched grid at the setting its finished search (a sweep folder of this file) "
                             "chose by the file's selection rule, on --seeds, to the end (no early stopping)")
    parser.add_argument("--report", metavar="RUN_ID_OR_DIR", nargs="+",
                        help="rewrite the report of a sweep and exit; several sweep folders of the same grids "
                             "(e.g. seeds added later) give one report over all their trials, in the first")
    parser.add_argument("--against", metavar="DIR", nargs="+",
                        help="with --report: another sweep's folders (one sweep file, e.g. the same seeds in another "
                             "regime); the report compares the claims both files state, paired by seed")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every trial")
    args = parser.parse_args(argv)
    if args.resume not in (None, "latest") and "=" in args.resume and not Path(args.resume).is_dir():
        # `--resume seed=1`: argparse hands the override to --resume's optional folder; it is an override
        args.overrides.insert(0, args.resume)
        args.resume = "latest"
    for option in ("report", "against"):  # `--report <folder> tracking.uri=...`: the list takes the override too
        given = getattr(args, option) or []
        overrides = [item for item in given if "=" in item and not Path(item).is_dir()]
        setattr(args, option, [item for item in given if item not in overrides] or None)
        args.overrides[:0] = overrides
    if args.against and not args.report:
        parser.error("--against compares with the sweep that --report names: give --report <folder> too")
    return args


def _seed_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give integers separated by commas, e.g. 3,4") from None


def main(argv: Optional[list[str]] = None) -> int:
    setup_logging()
    args = parse_args(argv)
    with exit_on_user_error():
        if args.report:
            return report_command(args.report, args.overrides, args.against)
        if not args.config:
            raise UserError("--config is required (a sweep file such as configs/sweeps/smoke.yaml)")
        check_given_once(args.overrides)
        choices = chosen_settings(args.config, args.chosen, args.overrides) if args.chosen else None
        sweep = load_sweep(args.config, args.overrides, args.seeds, args.grids,
                           {grid: c.setting for grid, c in choices.items()} if choices else None)
        if choices:
            print(describe_choices(choices, Path(args.chosen), sweep), flush=True)
        if args.dry_run:
            print(describe(sweep))
            return 0
        try:
            return run_sweep(sweep, args)
        except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (run_sweep forwards it as SIGINT)
            folder = getattr(err, "run_dir", None)
            if folder is None:
                print(f"interrupted before the sweep folder existed; nothing to resume: rerun "
                      f"{shlex.join(module_command('tune.sweep', argv))}", file=sys.stderr)
            else:
                print(f"interrupted; resume with: {shlex.join(resume_command(args, folder))}", file=sys.stderr)
            return 128 + getattr(err, "signum", signal.SIGINT)


def resume_command(args: argparse.Namespace, folder: Path) -> list[str]:
    """The command that continues the sweep in `folder` with the same settings."""
    options = [*(["--address", args.address] if args.address else []),
               *(["--shared-store"] if args.shared_store else []),
               *(["--seeds", ",".join(map(str, args.seeds))] if args.seeds else []),
               *(["--grids", ",".join(args.grids)] if args.grids else []),
               *(["--chosen", args.chosen] if args.chosen else [])]
    return [*module_command("tune.sweep", []), "--config", args.config, *options, *args.overrides, "--resume",
            str(folder)]


def chosen_settings(config: str, search_dir: str, overrides: list[str]) -> dict[str, Choice]:
    """What the search in `search_dir` chose for each searched grid of the sweep file `config`, by its selection
    rule (the file's `selection`, else the trials' finetune.select)."""
    folder = Path(search_dir).resolve()
    state = read_state(folder)
    searched = load_sweep(config, overrides, [t["axes"]["seed"] for t in state["trials"]][:1])
    # By name and grids, not by path: a search's records travel (kept in git, copied from another machine).
    if (state["name"], state["grids"]) != (searched.name, searched.grids):
        raise UserError(f"--chosen: {folder} is a sweep of {state['sweep_file']} (sweep {state['name']!r}), not of "
                        f"{config} (sweep {searched.name!r}, other grids or axes); give a search of this file")
    if not searched.space:
        raise UserError(f"--chosen: {config} searches no axis (no grid gives a distribution); run it without --chosen")
    rule = searched.selection or load_config(searched.base_config, overrides).finetune.select
    return choose(load_records(folder), {grid: list(axes) for grid, axes in searched.space.items()}, rule)


def describe_choices(choices: dict[str, Choice], folder: Path, sweep: Sweep) -> str:
    """The settings a search chose, as --chosen runs them."""
    rule = sweep.selection or "finetune.select"
    lines = [f"settings chosen by {rule} on valid from the search {folder}:"]
    for c in choices.values():
        setting = ", ".join(f"{a}={format_setting(v)}" for a, v in c.setting.items())
        lines.append(f"  {c.grid}: {setting} (score {c.score:.2f} over seed(s) {','.join(map(str, c.seeds))}; "
                     f"best of {c.candidates} finished, {c.stopped} stopped early)")
    return "\n".join(lines)


def describe(sweep: Sweep) -> str:
    """The --dry-run listing: counts, resources, and one line per trial."""
    res = sweep.resources
    lines = [f"sweep {sweep.name!r} ({sweep.path}): {len(sweep.trials)} trials from {len(sweep.grids)} grid(s), "
             f"{_cache_counts(sweep)}",
             f"base config {sweep.base_config}; MLflow experiment {sweep.experiment!r} at {sweep.tracking_uri}",
             f"per trial: cpu={res.cpu:g} gpu={res.gpu:g} processes={res.processes}; "
             f"at most {sweep.max_concurrent or 'as many as fit'} at once"]
    if sweep.search and not sweep.chosen:
        lines += describe_space(sweep.space, sweep.search, sweep.selection)
    lines += ["", "| trial | grids | axes |", "|---|---|---|"]
    for t in sweep.trials:
        axes = ", ".join(f"{a}={format_setting(v)}" for a, v in t.axes.items())
        lines.append(f"| {t.name} | {', '.join(t.grids)} | {axes} |")
    return "\n".join(lines)


def _cache_counts(sweep: Sweep) -> str:
    """How many models of each cached stage the trials need, and how many are cached already: the base (stages
    0-2) of every trial, the stage-1 M under it (none where a trial names its own stage1_checkpoint) and the stage-0
    θ (only where stage 0 runs). trials.ensure_stage builds them."""
    configs = [load_config(sweep.base_config, t.overrides) for t in sweep.trials if t.base_key]
    needed = {"probe": {base_key(c) for c in configs},
              "base": {base_key(c, "base") for c in configs if not c.stage1_checkpoint},
              "pretrain": {base_key(c, "pretrain") for c in configs if c.pretrain.epochs > 0}}
    cached = {stage: sum(trials.read_entry(trials.entry_dir(sweep.output_dir, k, stage)) is not None for k in keys)
              for stage, keys in needed.items()}
    parts = [f"{len(needed['probe'])} base model(s) ({cached['probe']} already cached)",
             f"{len(needed['base'])} stage-1 M ({cached['base']} cached)"]
    if needed["pretrain"]:
        parts.append(f"{len(needed['pretrain'])} stage-0 backbone(s) ({cached['pretrain']} cached)")
    return ", ".join(parts)


@contextmanager
def open_sweep(sweep: Sweep, args: argparse.Namespace) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A new sweep folder with its parent run and sweep.json, or the one `args.resume` names (its parent reopened),
    its lock held for the block: a second driver on a sweep whose driver runs is refused before it changes
    anything, with the command that continues it once the first has finished."""
    resume = args.resume
    if resume:
        def runs_these(state: dict[str, Any]) -> bool:
            return [(t["name"], t["overrides"]) for t in state["trials"]] == [(t.name, t.overrides) for t in sweep.trials]

        folder = (records.latest_sweep_dir(sweep.output_dir, sweep.name, runs_these) if resume == "latest"
                  else Path(resume).resolve())
        state = read_state(folder)
        if not runs_these(state):
            raise UserError(f"--resume: the trials of {sweep.path} differ from those of {folder}; "
                            "start a new sweep (without --resume) or restore the file")
    else:
        folder = records.new_sweep_dir(sweep.output_dir, sweep.name)
    proceed = f"continue it with: {shlex.join(resume_command(args, folder))}"
    with locked(folder, "sweep folder", proceed):
        if resume and records.holds_run(state["tracking_uri"], state["parent_run_id"]):
            records.reopen_parent(state["tracking_uri"], state["parent_run_id"])
        elif resume:
            # A sweep folder kept without its store (another machine, a deleted mlflow.db): the records in the
            # folder are the results; the trials still to run need a parent run to nest under.
            print(f"the MLflow store {state['tracking_uri']} does not hold this sweep's parent run "
                  f"{state['parent_run_id']}: the trials still to run are recorded under a new parent run (the "
                  f"finished trials' records in {folder} are kept)", flush=True)
            start_parent_run(sweep, folder, state)
        else:
            state = new_state(sweep, folder)
        yield folder, state


def selection_note(sweep: Sweep) -> str:
    """How the sweep's models were chosen, as its report, sweep.json and MLflow parent run state it."""
    rule = sweep.selection or "each trial's finetune.select"
    note = ("each model is its last fine-tuning epoch" if rule == "last"
            else f"each model's epoch chosen by {rule} on valid (never test)")
    if sweep.chosen:
        note += f"; each searched grid run at the setting its search chose by {rule} on valid"
    elif sweep.search:
        note += (f"; searched grids draw {sweep.search.num_samples} settings ({sweep.search.algorithm}, scheduler "
                 f"{sweep.search.scheduler}): choose with --chosen <this folder>")
    return note


def new_state(sweep: Sweep, folder: Path) -> dict[str, Any]:
    """The sweep.json of a new sweep in `folder`, with its MLflow parent run started."""
    state = {"name": sweep.name, "sweep_file": str(sweep.path), "base_config": str(sweep.base_config),
             "experiment": sweep.experiment, "tracking_uri": sweep.tracking_uri, "grids": sweep.grids,
             "resources": vars(sweep.resources), "trials": sweep.trial_dicts(),
             "claims": sweep.claims.to_dict() if sweep.claims else None, "selection": selection_note(sweep)}
    start_parent_run(sweep, folder, state)
    return state


def start_parent_run(sweep: Sweep, folder: Path, state: dict[str, Any]) -> None:
    """Start a new MLflow parent run for the sweep in `folder` and write its id into the folder's sweep.json."""
    state["parent_run_id"] = records.start_parent(
        state["tracking_uri"], sweep.experiment, sweep.name,
        tags={"sweep_dir": str(folder), "sweep.file": str(sweep.path), "sweep.selection": state["selection"]},
        params={"base_config": sweep.base_config, "trials": len(sweep.trials), "grids": json.dumps(sweep.grids),
                "resources": json.dumps(vars(sweep.resources)), "max_concurrent": sweep.max_concurrent})
    records.write_json(folder / records.STATE, state)


def trial_jobs(sweep: Sweep, folder: Path, state: dict[str, Any], retry_failed: bool) -> list[TrialJob]:
    """Jobs of the trials still to run; stale MLflow runs of those trials (from a killed attempt) are deleted."""
    children = records.child_runs(state["tracking_uri"], state["parent_run_id"])
    jobs, stale = [], []
    for trial in sweep.trials:
        record = records.read_record(records.trial_folder(folder, trial.name))
        if record is not None and (record.status in ("finished", "stopped") or not retry_failed):
            continue  # a trial ASHA stopped is an outcome, not a fault: never rerun
        job = TrialJob(name=trial.name, base_config=str(sweep.base_config), overrides=trial.overrides,
                       folder=str(records.trial_folder(folder, trial.name)), parent_run_id=state["parent_run_id"],
                       tracking_uri=state["tracking_uri"], experiment=sweep.experiment, resources=sweep.resources,
                       axes=trial.axes, grids=trial.grids, key=trial.base_key, output_dir=str(sweep.output_dir))
        jobs.append(job)
        stale += [r.info.run_id for r in records.trial_runs(children, job.folder, trial.name)]
    records.delete_runs(state["tracking_uri"], stale)
    return jobs


def run_sweep(sweep: Sweep, args: argparse.Namespace) -> int:
    """Run the trials that have no finished record, then report; the parent run ends FINISHED or KILLED."""
    address = args.address or os.environ.get("RAY_ADDRESS") or None  # Ray's own variable attaches too
    if address is not None:
        check_cluster_store(sweep.tracking_uri, args.shared_store)
    probe_store(sweep.tracking_uri, "the sweep's tracking URI")  # before the parent run: one line, not minutes
    # Before the sweep folder and its parent run exist: a refusal here leaves nothing behind but the generated data.
    configs = [load_config(sweep.base_config, t.overrides) for t in sweep.trials]
    registered.check(sweep, configs)  # before the data too
    trials.prepare_data(configs)
    trials.check_selection(configs)
    terminated: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        # `kill` gets Ctrl-C's clean shutdown: Tune's own SIGINT handler stops the trials (Ray's SIGTERM handler
        # aborted the driver, exit 134, and left the trials' runs RUNNING); the exit status remembers the signal
        terminated.append(signum)
        signal.raise_signal(signal.SIGINT)

    def received() -> int:
        return terminated[0] if terminated else signal.SIGINT

    with open_sweep(sweep, args) as (folder, state), interrupted_in(folder):
        print(f"sweep folder {folder}\nMLflow parent run {state['parent_run_id']} ({state['tracking_uri']})",
              flush=True)
        jobs = trial_jobs(sweep, folder, state, args.retry_failed)
        status, start = "KILLED", time.time()
        previous = signal.signal(signal.SIGTERM, forward)
        try:
            if jobs:
                execute(sweep, jobs, folder, address, forward)
            # Tune returns normally after its own Ctrl-C handling: unfinished trials tell the two apart.
            status = "FINISHED" if all(r.status != "pending" for r in load_records(folder)) else "KILLED"
        except KeyboardInterrupt:  # outside Tune (preparing data, starting Ray): a forwarded SIGTERM lands here too
            raise Interrupted(received()) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
            done = load_records(folder)
            report_dir = folder / "report"
            write_report(done, sweep.grids, report_dir, _title(sweep.name, state), sweep.claims)
            records.log_report(state["tracking_uri"], state["parent_run_id"], report_dir, _summary(report_dir))
            records.finish_parent(state["tracking_uri"], state["parent_run_id"], status, done)
        print(_closing(done, folder, time.time() - start))
        if status != "FINISHED":  # Tune returned after its own Ctrl-C handling
            raise Interrupted(received())
        registered.register_trials(sweep, done, state["parent_run_id"])
        return 1 if any(r.status == "failed" for r in done) else 0


def check_cluster_store(uri: str, shared: bool) -> None:
    """Refuse a local sqlite store for a sweep on a Ray cluster: trials on other nodes would each write a file of
    their own at that path (or, on NFS, share one with unreliable locking), and the runs would split."""
    if uri.startswith("sqlite:") and not shared:
        raise UserError(f"a sweep on a Ray cluster cannot record into the local sqlite store {uri} (trials on other "
                        "nodes would not see it); run `mlflow server --backend-store-uri " + uri + " --host 0.0.0.0 "
                        "--port 5000` on one node and pass tracking.uri=http://<that node>:5000, or add "
                        "--shared-store if that file is on a file system every node mounts")


def execute(sweep: Sweep, jobs: list[TrialJob], folder: Path, address: Optional[str],
            on_sigterm: Callable[[int, Any], None]) -> None:
    """Start Ray (or join `address`), check that a trial fits one node and, on a cluster, that every node sees the
    sweep folder; then run the trials with Tune. A trial whose base model is not cached yet trains it first (once:
    the others of that base wait on its lock), so trials start as soon as their own base exists; the first trial
    of each base goes first, so that the bases train in parallel."""
    if address is None:
        trials.local_ray_environment()
    with trials.ray_session(address):
        signal.signal(signal.SIGTERM, on_sigterm)  # again: starting Ray installed its own, which aborts the driver
        trials.check_resources(sweep.resources)
        if address is not None:
            trials.check_shared_folder(folder)
        entries = {k: trials.read_entry(trials.entry_dir(sweep.output_dir, k)) for k in {j.key for j in jobs if j.key}}
        jobs = [replace(job, base=entries.get(job.key)) for job in jobs]
        builders: dict[str, TrialJob] = {}  # base key → the first trial that needs it built
        for job in jobs:
            if job.key and job.base is None:
                builders.setdefault(job.key, job)
        jobs = [*builders.values(), *(job for job in jobs if builders.get(job.key) is not job)]
        attempt = len(list((folder / "ray").glob("attempt-*"))) + 1
        scheduler = early_stopping(sweep, jobs)
        last = trials.run_trials(jobs, sweep.resources, sweep.max_concurrent, folder / "ray", f"attempt-{attempt}",
                                 scheduler)
        for job in jobs:  # the trials ASHA stopped: their processes ended before they could record themselves
            record = records.read_record(Path(job.folder))
            if scheduler is not None and job.name in scheduler.stopped and (record is None or record.status == "pending"):
                result = last.get(job.name, {})
                metrics = {k: v for k, v in result.items() if k.startswith(search.REPORTED)}
                records.record_stopped(job, scheduler.stopped[job.name], metrics, result.get("time_total_s"))


def early_stopping(sweep: Sweep, jobs: list[TrialJob]):
    """ASHA over each (grid, seed) of a search whose scheduler is asha, or None: grids, --chosen and
    `scheduler: none` run every trial to its end."""
    if sweep.search is None or sweep.search.scheduler != "asha" or sweep.chosen:
        return None
    group = {job.name: search.grid_key(job.axes, job.grids) for job in jobs}
    max_t = max(trials.load_trial_config(job).finetune.epochs for job in jobs)
    return search.per_group_asha(sweep.search, max_t, group.__getitem__)


def _answer(report_dir: Path) -> str:
    """The report up to its per-trial table: the claims, each grid's table and its paired verdicts."""
    return (report_dir / "report.md").read_text().split("## Trials")[0].strip()


def _summary(report_dir: Path) -> str:
    """The parent run's description: the answer without its plots (they are artifacts beside the report)."""
    text = "\n".join(line for line in _answer(report_dir).splitlines() if not line.startswith("!["))
    return (f"{text}\n\nEach trial is a run nested below, named after its setting. Artifacts: `report/` (report.md "
            "with every trial, plots, CSVs); `tables/` holds the same tables, sortable.")


def _closing(done: list[TrialRecord], folder: Path, seconds: float) -> str:
    """The answer, one line per failed trial naming its traceback's file in the sweep folder (Ray's own copy is in
    its session folder, deleted when the sweep ends), and the counts."""
    counts, report_dir = status_counts(done), folder / "report"
    failed = [f"trial {r.name} failed: {r.error.splitlines()[0] if r.error else 'no error recorded'}; "
              f"traceback: {records.trial_folder(folder, r.name) / records.ERROR_FILE}"
              for r in done if r.status == "failed"]
    return "\n".join([_answer(report_dir), "", *failed,
                      f"{counts['finished']} finished, {counts['stopped']} stopped early, {counts['failed']} failed, "
                      f"{counts['pending']} pending in {seconds:.0f} s; report: {report_dir}/report.md"])


def report_command(targets: list[str], overrides: list[str], against: Optional[list[str]] = None) -> int:
    """--report: rebuild the report from sweep folders' records or from an MLflow parent run's children
    (and, --against, compare its claims with another sweep's)."""
    target = targets[0]
    if Path(target).is_dir():
        found, state = _merged(targets, "--report")
        folder = Path(target).resolve()
        grids, uri, run_id = state["grids"], state["tracking_uri"], state["parent_run_id"]
        claims = _claims(folder, state)
        report_dir, title = folder / "report", _title(state["name"], state)
        if len(targets) > 1:
            title += f" ({len(targets)} sweeps merged: {', '.join(Path(t).name for t in targets)})"
    elif len(targets) > 1 or against:
        raise UserError(f"--report: {'--against needs' if against else 'several targets must all be'} sweep folders, "
                        "not MLflow run ids")
    else:
        uri = tracking_uri(load_config(None, overrides))
        found, parent = records.records_from_mlflow(uri, target)
        grids, run_id = json.loads(parent.data.params.get("grids", "{}")), target
        sweep_dir = Path(parent.data.tags.get("sweep_dir", ""))
        report_dir = sweep_dir / "report" if sweep_dir.is_dir() else Path.cwd() / f"sweep-report-{target[:8]}"
        claims = _claims(sweep_dir, read_state(sweep_dir)) if sweep_dir.is_dir() else None
        title = f"Sweep {parent.info.run_name}"
    other = None
    if against:
        other_found, other_state = _merged(against, "--against")
        other_claims = _claims(Path(against[0]).resolve(), other_state)
        if claims is None or other_claims is None:
            raise UserError(f"--against: {target if claims is None else against[0]} has no claims section; a "
                            "comparison needs a sweep file with claims on both sides")
        other = Other(other_state["name"], other_found, other_claims)
    paths = write_report(found, grids, report_dir, title, claims, other)
    if records.holds_run(uri, run_id):
        records.log_report(uri, run_id, report_dir, _summary(report_dir))
    else:  # a sweep folder kept without its store (copied, or its machine gone): the files are the report
        print(f"note: the MLflow store {uri} does not hold the sweep's parent run {run_id}; the report is written to "
              f"{report_dir} only", file=sys.stderr)
    print("\n".join(str(p) for p in paths))
    return 0


def _merged(folders: list[str], option: str) -> tuple[list[TrialRecord], dict[str, Any]]:
    """The records of several sweep folders of the same grids (e.g. seeds added later), and the first's state."""
    state = read_state(Path(folders[0]).resolve())
    found = load_records(Path(folders[0]).resolve())
    for more in folders[1:]:
        if read_state(Path(more).resolve())["grids"] != state["grids"]:
            raise UserError(f"{option}: {more} has other grids than {folders[0]}; merge only sweeps of one file")
        found += load_records(Path(more).resolve())
    return found, state


def _title(name: str, state: dict[str, Any]) -> str:
    """The report's title, with how its models were chosen (sweeps written before selection notes have none)."""
    return f"Sweep {name}" + (f" ({state['selection']})" if state.get("selection") else "")


def _claims(folder: Path, state: dict[str, Any]) -> Optional[Claims]:
    """The claims section the sweep was started with (sweeps written before claims existed have none)."""
    return parse_claims(str(folder / "sweep.json"), state["claims"]) if state.get("claims") else None


if __name__ == "__main__":
    sys.exit(main())
