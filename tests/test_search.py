"""Searches in sweep files (tune/search.py): the space and its bad values, Ray Tune's distributions, ASHA per
(grid, seed) and the trials it stops, the setting a selection rule chooses, and the protocol end to end."""

from __future__ import annotations

import json
import math
import subprocess
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.test_sweep import REPO, _env, _marked_processes, _sweep_cli, _write_sweep, ray_tmp  # noqa: F401
from distributed_asac.errors import UserError
from tune import search
from tune.records import RECORD, TrialRecord, read_state
from tune.spec import load_sweep
from tune.sweep import main

SPACE = {"finetune.lr": {"loguniform": [1.0e-4, 1.0e-2]}}
SEED = 3  # the search seed whose draws of choice [0.001, 1.0] are 0.001, then 1.0
SEARCH = {"num_samples": 3, "seed": 0, "scheduler": "asha", "metric": "valid_worst_group_ACC", "mode": "max"}


def test_draws_are_ray_tunes_draw_for_draw():
    """`search.sample` against Ray Tune's own samplers fed the same numpy Generator."""
    from tune.trials import local_ray_environment

    local_ray_environment()  # Ray reads its local settings when imported
    from ray import tune

    domains = {"choice": ([0.1, "a", [1, 2]], tune.choice([0.1, "a", [1, 2]])),
               "uniform": ([0.2, 0.8], tune.uniform(0.2, 0.8)),
               "loguniform": ([1e-5, 1e-1], tune.loguniform(1e-5, 1e-1)),
               "randint": ([2, 9], tune.randint(2, 9))}
    for kind, (args, domain) in domains.items():
        ours, theirs = np.random.default_rng(7), np.random.default_rng(7)
        for _ in range(50):
            mine, ray_draw = search.sample(kind, args, ours), domain.sample(random_state=theirs)
            assert mine == pytest.approx(ray_draw, rel=1e-12) if isinstance(mine, float) else mine == ray_draw, kind


def test_a_search_draws_num_samples_settings_per_grid_seeded_and_in_range(tmp_path):
    path = _write_sweep(tmp_path, "s", {"plain": {"mode": ["plain"], **SPACE},
                                        "eta": {"mode": ["group_dro"], "group_dro.eta": {"uniform": [0.01, 0.1]}}},
                        search=SEARCH, selection="worst_group_valid", seeds=[0, 1])
    sweep = load_sweep(path)
    assert len(sweep.trials) == 2 * 3 * 2  # 2 grids × 3 draws × 2 seeds
    lrs = {t.axes["finetune.lr"] for t in sweep.trials if "finetune.lr" in t.axes}
    assert len(lrs) == 3 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    assert all(float(f"{lr:.4g}") == lr for lr in lrs)  # settings a reader can type back
    again = load_sweep(path)
    assert [t.overrides for t in again.trials] == [t.overrides for t in sweep.trials]  # seeded
    # The file's rule keeps every trial's epoch.
    assert all("finetune.select=worst_group_valid" in t.overrides for t in sweep.trials)
    # Another grid name draws other settings from the same seed (each grid its own stream).
    assert search.draw("a", SPACE, search.Search(3)) != search.draw("b", SPACE, search.Search(3))


@pytest.mark.parametrize("change, message", [
    ({"grids": {"g": {"finetune.lr": {"lognormal": [0, 1]}}}}, "unknown distribution 'lognormal'"),
    ({"grids": {"g": {"finetune.lr": {"uniform": [0.1, 0.01]}}}}, "uniform needs low < high; got [0.1, 0.01]"),
    ({"grids": {"g": {"finetune.lr": {"loguniform": [0, 0.1]}}}}, "loguniform needs low > 0"),
    ({"grids": {"g": {"finetune.pgd_steps": {"randint": [1.5, 4]}}}}, "randint needs integers"),
    ({"grids": {"g": {"finetune.lr": {"choice": []}}}}, "choice needs a non-empty list"),
    ({"search": {**SEARCH, "metric": "test_ACC"}}, "metric 'test_ACC' is not reported by any trial"),
    ({"search": {**SEARCH, "scheduler": "hyperband"}}, "scheduler 'hyperband' is not one of asha, none"),
    ({"search": {**SEARCH, "algorithm": "optuna"}}, "algorithm 'optuna' is not one of random"),
    ({"search": {**SEARCH, "num_samples": 0}}, "num_samples must be a positive integer"),
    ({"search": {"seed": 0}}, "give num_samples"),
    ({"selection": "best_test"}, "selection 'best_test' is not a rule"),
    ({"search": None}, "gives 'finetune.lr' a distribution, which needs a 'search:' section"),
])
def test_bad_search_is_one_error_line_and_creates_nothing(tmp_path, capsys, change, message):
    change = dict(change)
    grids = change.pop("grids", {"g": {"mode": ["plain"], **SPACE}})
    extra = {"search": SEARCH, **change}
    if extra["search"] is None:
        del extra["search"]
    path = _write_sweep(tmp_path, "bad", grids, **extra)
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(path), "--dry-run"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no store, no folder


def test_a_rule_that_needs_groups_refuses_a_valid_split_without_one(tmp_path, smoke_config):
    """worst_group_valid on a valid split missing a (target, protected) group: refused before training."""
    from distributed_asac import pipeline
    from distributed_asac.errors import UserError

    cfg = smoke_config(tmp_path, "finetune.select=worst_group_valid", "data.synthetic_bias=1.0",
                       "data.synthetic_num_images=120", "base.epochs=1")
    with pytest.raises(UserError, match=r"finetune.select=worst_group_valid needs every \(target, protected\) group "
                                        r"in the valid split.*use finetune.select=avg_valid"):
        pipeline.run(cfg, variants=[{"mode": "plain"}])
    assert not (tmp_path / "runs").exists()


def test_a_sweep_whose_rule_needs_groups_valid_lacks_is_refused_before_it_starts(tmp_path, capsys):
    """The same refusal for a whole sweep: one line, exit 2, before its folder, parent run or Ray exist (the store is
    probed first, so that a bad one is told in seconds: it may exist, empty)."""
    path = _write_sweep(tmp_path, "nogroups", {"g": {"mode": ["plain"], **SPACE}}, search=SEARCH,
                        selection="worst_group_valid")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(path), "data.synthetic_bias=1.0", "data.synthetic_num_images=120"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "finetune.select=worst_group_valid needs every (target, protected) group in the valid split" in err
    assert not (tmp_path / "runs").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def _record(name: str, grid: str, lr: float, seed: int, score: float, status: str = "finished") -> TrialRecord:
    return TrialRecord(name, {"finetune.lr": lr, "seed": seed}, [grid], status,
                       metrics={"selected_valid_worst_group_ACC": score, "selected_valid_ACC": 90.0 - score})


def test_the_chosen_setting_has_the_best_mean_valid_score_over_its_seeds():
    records = [_record("a0", "plain", 0.01, 0, 50.0), _record("a1", "plain", 0.01, 1, 10.0),  # mean 30
               _record("b0", "plain", 0.001, 0, 40.0), _record("b1", "plain", 0.001, 1, 30.0),  # mean 35: chosen
               _record("c0", "plain", 0.1, 0, 99.0, status="stopped"),  # never chosen
               _record("d0", "dro", 0.1, 0, math.nan), _record("d1", "dro", 0.2, 0, 5.0)]
    chosen = search.choose(records, {"plain": ["finetune.lr"], "dro": ["finetune.lr"]}, "worst_group_valid")
    assert chosen["plain"].setting == {"finetune.lr": 0.001} and chosen["plain"].score == 35.0
    assert chosen["plain"].seeds == [0, 1] and chosen["plain"].stopped == 1 and chosen["plain"].candidates == 2
    assert chosen["dro"].setting == {"finetune.lr": 0.2}  # a NaN score is never chosen
    assert search.choose(records, {"plain": ["finetune.lr"]}, "avg_valid")["plain"].setting == {"finetune.lr": 0.01}


def test_chosen_reads_a_search_kept_elsewhere_and_refuses_another_files(tmp_path):
    """--chosen on a search's records copied from another machine (its sweep.json names that machine's file path):
    the search is this file's by its name and grids, so its choice is read; a search of another sweep file is
    refused in one line naming both."""
    from tune.records import write_json, write_record
    from tune.sweep import chosen_settings

    path = _write_sweep(tmp_path, "kept", {"plain": {"mode": ["plain"], **SPACE}}, search=SEARCH,
                        selection="worst_group_valid")
    sweep = load_sweep(path)
    folder = tmp_path / "copied" / "search"
    for trial, score in zip(sweep.trials, (40.0, 60.0, 50.0)):
        record = _record(trial.name, "plain", trial.axes["finetune.lr"], 0, score)
        write_record(folder / "trials" / trial.name, record)
    state = {"name": sweep.name, "sweep_file": "/elsewhere/configs/sweeps/kept.yaml", "grids": sweep.grids,
             "trials": sweep.trial_dicts()}
    write_json(folder / "sweep.json", state)
    chosen = chosen_settings(str(path), str(folder), [])
    assert chosen["plain"].setting == {"finetune.lr": sweep.trials[1].axes["finetune.lr"]}
    other = _write_sweep(tmp_path, "other", {"plain": {"mode": ["plain"], **SPACE}}, search=SEARCH,
                         selection="worst_group_valid")
    with pytest.raises(UserError, match=r"is a sweep of /elsewhere/configs/sweeps/kept\.yaml \(sweep 'kept'\), not of "
                                        r".*other\.yaml \(sweep 'other'"):
        chosen_settings(str(other), str(folder), [])


class _Trial:
    def __init__(self, name: str):
        self.config, self.trial_id = {"trial": name}, name


def test_asha_runs_per_group_and_remembers_what_it_stopped():
    """Three trials of one group reach epoch 1 in turn: the second, above the first, continues; the third, below the
    median of the first two, is stopped; a trial of another group with the same low score is compared only with its
    own group, and continues."""
    scheduler = search.per_group_asha(search.Search(3, metric="valid_ACC"), max_t=4,
                                      group_of=lambda name: name.split("-")[0])
    trials = {name: _Trial(name) for name in ("a-1", "a-2", "a-3", "b-1")}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)
    decisions = {name: scheduler.on_trial_result(None, trials[name], {"epoch": 1, "valid_ACC": acc})
                 for name, acc in (("a-1", 70.0), ("a-2", 80.0), ("a-3", 50.0), ("b-1", 50.0))}
    assert decisions == {"a-1": "CONTINUE", "a-2": "CONTINUE", "a-3": "STOP", "b-1": "CONTINUE"}
    assert scheduler.stopped == {"a-3": 1}
    # At max_t a trial finishes its own run: never recorded as stopped.
    assert scheduler.on_trial_result(None, trials["a-2"], {"epoch": 4, "valid_ACC": 1.0}) in ("CONTINUE", "STOP")
    assert "a-2" not in scheduler.stopped


@pytest.fixture(scope="module")
def protocol(tmp_path_factory, ray_tmp) -> SimpleNamespace:  # noqa: F811 - ray_tmp is the imported fixture
    """The protocol on the smoke config: a search of one row whose second drawn setting (lr 1.0) is hopeless, run one
    trial at a time with ASHA on valid accuracy (a trial is stopped at epoch 1 when below the median of those that
    reached it before); then the chosen setting on seed 0."""
    root = tmp_path_factory.mktemp("search")
    space = {"finetune.lr": {"choice": [0.001, 1.0]}}
    # Seed SEED draws 0.001, then 1.0 (asserted below): the hopeless one reaches epoch 1 second.
    path = _write_sweep(root, "protocol", {"plain": {"mode": ["plain"], **space}},
                        search={"num_samples": 2, "seed": SEED, "scheduler": "asha", "grace_period": 1,
                                "reduction_factor": 2, "metric": "valid_ACC", "mode": "max"},
                        selection="avg_valid", max_concurrent=1)
    marker = uuid.uuid4().hex
    common = ["finetune.epochs=2", "base.epochs=4", "analysis.robustness_images=0", "analysis.ig_images=0"]
    searched = subprocess.run(_sweep_cli("--config", str(path), *common), env=_env(marker, ray_tmp), cwd=REPO,
                              capture_output=True, text=True, timeout=900)
    (folder,) = (root / "runs" / "sweeps" / "protocol").iterdir()
    chosen = subprocess.run(_sweep_cli("--config", str(path), "--chosen", str(folder), *common),
                            env=_env(marker, ray_tmp), cwd=REPO, capture_output=True, text=True, timeout=900)
    return SimpleNamespace(root=root, path=path, folder=folder, searched=searched, chosen=chosen, marker=marker,
                           ray_tmp=ray_tmp)


@pytest.mark.slow  # two sweeps with Ray, ~80 s: the default suite covers ASHA's decisions and the choice as units
def test_asha_stops_the_hopeless_trial_and_records_it_as_stopped(protocol):
    assert protocol.searched.returncode == 0, protocol.searched.stderr[-3000:]
    state = read_state(protocol.folder)
    assert [t["axes"]["finetune.lr"] for t in state["trials"]] == [0.001, 1.0]  # the premise
    records = {t["axes"]["finetune.lr"]: json.loads((protocol.folder / "trials" / t["name"] / RECORD).read_text())
               for t in state["trials"]}
    assert records[0.001]["status"] == "finished"
    stopped = records[1.0]
    assert stopped["status"] == "stopped" and stopped["stopped_epoch"] == 1 and stopped["error"] is None
    assert stopped["metrics"]["last_valid_ACC"] < records[0.001]["metrics"]["selected_valid_ACC"]
    client = MlflowClient(f"sqlite:///{protocol.root / 'mlflow.db'}")
    [run] = [client.get_run(i) for i in stopped["mlflow_run_ids"] if client.get_run(i).data.tags.get("stage") == "finetune"]
    assert run.info.status == "KILLED" and run.data.tags["sweep.stopped_at_epoch"] == "1"
    # Every finished trial reported each epoch's validation metrics: MLflow holds the per-epoch curve.
    finished = client.get_run(records[0.001]["mlflow_run_ids"][-1])
    history = client.get_metric_history(finished.info.run_id, "finetune/valid_worst_group_ACC")
    assert sorted(m.step for m in history) == [0, 1]
    report = (protocol.folder / "report" / "report.md").read_text()
    assert "1 stopped early by ASHA" in report and "stopped after epoch 1" in report
    assert "chosen by avg_valid on valid" in report
    assert _marked_processes(protocol.marker, protocol.ray_tmp) == {}


@pytest.mark.slow
def test_chosen_runs_the_setting_with_the_best_valid_score(protocol):
    assert protocol.chosen.returncode == 0, protocol.chosen.stderr[-3000:]
    best = max((json.loads(p.read_text()) for p in protocol.folder.glob(f"trials/*/{RECORD}")),
               key=lambda r: r["metrics"].get("selected_valid_ACC", -1))
    assert f"plain: finetune.lr={best['axes']['finetune.lr']:g}" in protocol.chosen.stdout
    runs = sorted(p for p in protocol.folder.parent.iterdir() if p != protocol.folder)
    [trial] = read_state(runs[-1])["trials"]
    assert trial["axes"]["finetune.lr"] == best["axes"]["finetune.lr"]
    record = json.loads((runs[-1] / "trials" / trial["name"] / RECORD).read_text())
    assert record["status"] == "finished"
    # The same seed, setting and base: the chosen run reproduces the search's trial bit for bit.
    assert record["metrics"]["ACC"] == best["metrics"]["ACC"] and record["metrics"]["DEO"] == best["metrics"]["DEO"]
