"""Search: settings drawn from distributions, early stopping with ASHA, and the setting a selection rule chooses.

A grid axis whose value is a distribution instead of a list is searched:

    search:
      num_samples: 8               # settings drawn per grid (crossed with the grid's list axes and the seeds)
      algorithm: random            # Ray Tune's random search (the only one: see tune/README.md, Search)
      seed: 0                      # the draws are a function of this seed and the grid's name
      scheduler: asha              # asha: stop hopeless trials at ASHA's rungs; none: run every trial to its end
      grace_period: 1              # ASHA: the first rung, in fine-tuning epochs
      reduction_factor: 2          # ASHA: keep the best 1/reduction_factor at each rung
      metric: valid_worst_group_ACC  # what ASHA compares, reported after every fine-tuning epoch
      mode: max
    selection: worst_group_valid   # the rule that keeps each trial's epoch and chooses each grid's setting
    grids:
      group_dro:
        finetune.mode: [group_dro]
        finetune.lr: {loguniform: [1.0e-4, 1.0e-2]}
        group_dro.eta: {loguniform: [1.0e-3, 1.0e-1]}

Distributions are Ray Tune's (`tune.choice`, `tune.uniform`, `tune.loguniform`, `tune.randint`: randint's upper
bound is exclusive), drawn as its random search draws them (`sample`), in the driver, from a seeded random state
before Ray starts: each drawn setting is then an ordinary trial, validated, named and resumable like a grid point. ASHA runs once per (grid, seed), so a row's
settings compete only with each other.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from distributed_asac import selection
from distributed_asac.config import SELECTION_RULES
from distributed_asac.errors import UserError
from distributed_asac.metrics import HEADLINE
from distributed_asac.registry import suggest

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
ALGORITHMS = ("random",)
SCHEDULERS = ("asha", "none")
# What every fine-tuning epoch reports to Ray Tune (stage 3's validation metrics): what ASHA may compare.
REPORTED = tuple(f"{split}_{name}" for split in ("valid", "balanced_valid") for name in HEADLINE)
KEYS = ("num_samples", "algorithm", "seed", "scheduler", "grace_period", "reduction_factor", "metric", "mode")
DIGITS = 4  # significant digits a drawn number keeps: settings a reader can type back


@dataclass(frozen=True)
class Search:
    num_samples: int
    algorithm: str = "random"
    seed: int = 0
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    metric: str = "valid_worst_group_ACC"
    mode: str = "max"


def parse_search(path: Path, data: Any) -> Search:
    """The `search:` section, refused in one line for any bad value."""
    if not isinstance(data, dict):
        raise UserError(f"{path}: 'search' must be a mapping, e.g. {{num_samples: 8, scheduler: asha}}; got {data!r}")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise UserError(f"{path}: search: unknown key {unknown[0]!r}{suggest(str(unknown[0]), list(KEYS))}")
    if "num_samples" not in data:
        raise UserError(f"{path}: search: give num_samples, the settings drawn per grid (e.g. num_samples: 8)")
    search = Search(**data)
    for key in ("num_samples", "grace_period", "seed"):
        value = getattr(search, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "seed" else 1):
            raise UserError(f"{path}: search: {key} must be a {'non-negative' if key == 'seed' else 'positive'} "
                            f"integer; got {value!r}")
    if not isinstance(search.reduction_factor, int) or search.reduction_factor < 2:
        raise UserError(f"{path}: search: reduction_factor must be an integer >= 2; got {search.reduction_factor!r}")
    for key, allowed in (("algorithm", ALGORITHMS), ("scheduler", SCHEDULERS), ("mode", ("max", "min"))):
        value = getattr(search, key)
        if value not in allowed:
            raise UserError(f"{path}: search: {key} {value!r} is not one of {', '.join(allowed)}"
                            f"{suggest(str(value), list(allowed))}")
    if search.metric not in REPORTED:
        raise UserError(f"{path}: search: metric {search.metric!r} is not reported by any trial after its epochs; "
                        f"use one of {', '.join(REPORTED)}{suggest(str(search.metric), list(REPORTED))}")
    return search


def parse_selection(path: Path, value: Any) -> str:
    if value not in SELECTION_RULES:
        raise UserError(f"{path}: selection {value!r} is not a rule; use one of {', '.join(SELECTION_RULES)}"
                        f"{suggest(str(value), list(SELECTION_RULES))}")
    return value


def is_distribution(value: Any) -> bool:
    """A searched axis gives a mapping (one distribution); a grid axis gives a list."""
    return isinstance(value, dict)


def check_distribution(where: str, spec: dict) -> None:
    """Refuse, in one line naming the grid and axis (`where`), a distribution Ray Tune could not sample as meant."""
    if len(spec) != 1:
        raise UserError(f"{where}: give one distribution, e.g. {{loguniform: [1.0e-4, 1.0e-2]}}; got {spec!r}")
    [(kind, args)] = spec.items()
    if kind not in DISTRIBUTIONS:
        raise UserError(f"{where}: unknown distribution {kind!r}{suggest(str(kind), list(DISTRIBUTIONS))}; use one "
                        f"of {', '.join(DISTRIBUTIONS)}")
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise UserError(f"{where}: choice needs a non-empty list of values; got {args!r}")
        return
    numbers = isinstance(args, list) and len(args) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in args)
    if not numbers:
        raise UserError(f"{where}: {kind} needs [low, high], two finite numbers; got {args!r}")
    low, high = args
    if low >= high:
        raise UserError(f"{where}: {kind} needs low < high; got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise UserError(f"{where}: loguniform needs low > 0 (it draws log-uniformly); got [{low}, {high}]")
    if kind == "randint" and not all(isinstance(v, int) for v in args):
        raise UserError(f"{where}: randint needs integers [low, high) (high is excluded); got {args!r}")


def sample(kind: str, args: list, rng) -> Any:
    """One draw of Ray Tune's distribution `kind` from the numpy Generator `rng`, as Ray Tune's own sampler draws it
    from the same Generator (tests/test_search.py checks them draw for draw). Written here, not called there:
    importing Ray in the driver before `trials.local_ray_environment` would start it with the wrong settings."""
    if kind == "choice":
        return args[int(rng.choice(len(args)))]
    if kind == "uniform":
        return rng.uniform(args[0], args[1])
    if kind == "loguniform":  # uniform in log10, as tune.loguniform(low, high) with its default base 10
        return 10 ** rng.uniform(math.log(args[0]) / math.log(10), math.log(args[1]) / math.log(10))
    return rng.integers(args[0], args[1])  # randint: high excluded


def draw(grid: str, space: dict[str, dict], search: Search) -> list[dict[str, Any]]:
    """`search.num_samples` settings of the searched axes of one grid (random search), from a random state seeded by
    the search's seed and the grid's name: adding a grid never changes another's draws."""
    import numpy as np

    rng = np.random.default_rng([search.seed, zlib.crc32(grid.encode())])
    return [{axis: _plain(sample(kind, args, rng)) for axis, spec in space.items() for kind, args in spec.items()}
            for _ in range(search.num_samples)]


def _plain(value: Any) -> Any:
    """A sampled value as YAML and the config read it: Python numbers, floats rounded to DIGITS significant digits."""
    if hasattr(value, "item"):  # a numpy scalar
        value = value.item()
    if isinstance(value, float):
        return float(f"{value:.{DIGITS}g}")
    return value


def setting_score(rule: str, metrics: dict[str, Any]) -> float:
    """A finished trial's score under `rule`: its kept epoch's valid metric (stage 3's `selected_*`), never test."""
    return selection.score(rule, {k.removeprefix("selected_"): v for k, v in metrics.items()
                                  if k.startswith("selected_")})


@dataclass
class Choice:
    grid: str
    setting: dict[str, Any]  # the grid's searched axes → chosen value
    score: float  # its mean score over the search's seeds
    seeds: list[int]
    candidates: int  # finished settings it was chosen from
    stopped: int  # settings ASHA stopped early (never chosen)


def choose(records: list, space: dict[str, list[str]], rule: str) -> dict[str, Choice]:
    """Per grid with searched axes (`space`: grid → those axes), the finished setting whose mean score over its seeds
    is highest under `rule` (ties: the first drawn). A grid with no finished trial is refused: rerun or widen it."""
    chosen = {}
    for grid, axes in space.items():
        mine = [r for r in records if grid in r.grids]
        scores: dict[str, tuple[dict[str, Any], list[float], list[int]]] = {}
        for record in mine:
            if record.status != "finished":
                continue
            setting = {axis: record.axes[axis] for axis in axes}
            entry = scores.setdefault(repr(sorted(setting.items())), (setting, [], []))
            entry[1].append(setting_score(rule, record.metrics))
            entry[2].append(record.axes.get("seed"))
        ranked = [(sum(s) / len(s), setting, seeds) for setting, s, seeds in scores.values()
                  if not any(math.isnan(v) for v in s)]
        if not ranked:
            raise UserError(f"--chosen: grid {grid!r} has no finished trial with a {rule} score to choose from "
                            f"({len(mine)} trials); resume or rerun its search")
        best = max(ranked, key=lambda entry: entry[0])  # max keeps the first of equal scores
        chosen[grid] = Choice(grid, best[1], best[0], sorted(best[2]), len(ranked),
                              sum(r.status == "stopped" for r in mine))
    return chosen


def grid_key(axes: dict[str, Any], grids: list[str]) -> str:
    """What ASHA compares a trial within: its (first) grid and its seed."""
    return f"{grids[0]}|seed={axes.get('seed')}"


def per_group_asha(search: Search, max_t: int, group_of: Callable[[str], str]):
    """A Tune scheduler running one ASHA per group (`group_of(trial name)`), remembering each trial it stopped (name
    → the epoch it stopped after) so that the driver can record it as stopped, not failed."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

    class PerGroupASHA(FIFOScheduler):
        def __init__(self):
            super().__init__()
            self.groups: dict[str, ASHAScheduler] = {}
            self.stopped: dict[str, int] = {}

        def _asha(self, trial) -> ASHAScheduler:
            # stop_last_trials=False: a trial that reaches max_t finishes its own run (its test evaluation and record)
            return self.groups.setdefault(group_of(trial.config["trial"]), ASHAScheduler(
                time_attr="epoch", metric=search.metric, mode=search.mode, max_t=max_t,
                grace_period=min(search.grace_period, max_t), reduction_factor=search.reduction_factor,
                brackets=1, stop_last_trials=False))

        def on_trial_add(self, tune_controller, trial) -> None:
            self._asha(trial).on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            decision = self._asha(trial).on_trial_result(tune_controller, trial, result)
            if decision == TrialScheduler.STOP and result.get("epoch", max_t) < max_t:
                self.stopped[trial.config["trial"]] = int(result["epoch"])
            return decision

        def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
            self._asha(trial).on_trial_complete(tune_controller, trial, result)

        def on_trial_remove(self, tune_controller, trial) -> None:
            self._asha(trial).on_trial_remove(tune_controller, trial)

    return PerGroupASHA()


def describe_space(grids_space: dict[str, dict[str, dict]], search: Search, selection_rule: Optional[str]) -> list[str]:
    """The --dry-run lines of a search: the settings, then each grid's distributions."""
    lines = [f"search: {search.algorithm}, {search.num_samples} setting(s) per grid (seed {search.seed}); scheduler "
             f"{search.scheduler}" + (f" (grace {search.grace_period}, reduction {search.reduction_factor}, "
                                      f"{search.mode} {search.metric})" if search.scheduler == "asha" else "")
             + f"; selection {selection_rule or 'the config default'}"]
    for grid, space in grids_space.items():
        shown = ", ".join(f"{axis} ~ {kind}{args}" for axis, spec in space.items() for kind, args in spec.items())
        lines.append(f"  grid {grid}: {shown}")
    return lines
