"""A sweep file: the base experiment config, named grids of ablation axes, seeds and per-trial resources.

    name: smoke                          # sweep folder and MLflow parent-run name (default: the file's stem)
    base_config: configs/smoke.yaml      # relative to the working directory, like every path in configs/
    experiment: smoke-sweep              # MLflow experiment of the parent and child runs (default: the config's)
    overrides: {finetune.epochs: 1}      # for every trial and base model
    seeds: [0, 1]                        # crossed with every grid; the report averages over them
    resources: {cpu: 1, gpu: 0, processes: 1}
    max_concurrent: 2
    grids:                               # one report table per grid; their trials are pooled and deduplicated
      order: {order: [ascending, random]}
      alpha: {alpha: [0.3, 0.7]}

`axes:` (one mapping of axes) is short for a single grid named `grid`. An axis is a short name from `AXES`
or any dotted config key; a mapping value sets several keys of that section at once (a `dataset` value such
as `{name: celeba, root: data/celeba}`). An axis given a distribution instead of a list (`finetune.lr:
{loguniform: [1.0e-4, 1.0e-2]}`) is searched: the file's `search:` section says how many settings are drawn and
whether ASHA stops hopeless ones, and `selection:` which rule keeps each trial's epoch and chooses each grid's
setting (search.py). Every trial's config is built with `load_config` here, so an unknown key or value is one
error line before Ray starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from distributed_asac.config import Config, load_config
from distributed_asac.errors import UserError, first_line
from distributed_asac.registry import suggest
from distributed_asac.tracking import tracking_uri

from .claims import Claims, check_claims, measured, parse_claims
from .search import Search, check_distribution, draw, is_distribution, parse_search, parse_selection

# Short axis names of the paper's ablations → config keys.
AXES = {
    "eps": "finetune.eps", "alpha": "finetune.alpha", "order": "finetune.order", "attack": "finetune.attack",
    "mode": "finetune.mode", "backbone": "model.backbone", "target": "data.target", "protected": "data.protected",
    "dataset": "data",
}
# Keys no axis may vary: trials must log to one experiment and store and write under the sweep folder; seeds
# are the top-level `seeds` list so that the report can average over them.
RESERVED = ("experiment", "output_dir", "tracking", "seed")
# Path-valued config keys; False: the value may be a keyword instead (model.weights: imagenet), so only a
# relative path that exists is pinned.
_PATHS = {"data.root": True, "data.cache_dir": True, "data.split_file": True, "output_dir": True,
          "base_checkpoint": True, "stage1_checkpoint": True, "pretrain.root": True, "model.weights": False}
# What stages 0–2 read, hence what defines a base model: the data section (minus how images are loaded), the
# model, pretrain, base and probe sections, the seed, a given stage-1 M, the optimiser settings and whether batch
# norm trains over the global batch (on several processes, another model).
_DATA_LOADER_ONLY = ("data.num_workers", "data.cache_dir")
_BASE_TOP_LEVEL = ("seed", "grad_clip", "adam_betas", "adam_eps", "sync_batchnorm", "stage1_checkpoint")
# What stage 1 does not read (stage 2's): its M is the same bit for bit whatever C is trained on it.
_STAGE_TWO_ONLY = ("probe.", "model.protected_classifier")
# What stage 0 reads besides its own section: its backbone and start, the look of its generated faces, the optimiser.
_STAGE_ZERO_READS = ("model.backbone", "model.weights", "data.image_size", "data.synthetic_smile_floor",
                     "data.synthetic_beard_strength", "data.on_bad_image", "grad_clip", "adam_betas", "adam_eps",
                     "sync_batchnorm")
# The stages whose models the base cache keeps (trials.py): stage 0's θ, stage 1's M, and the base of stages 1–2.
CACHED_STAGES = ("pretrain", "base", "probe")
TOP_KEYS = ("name", "base_config", "experiment", "overrides", "seeds", "grids", "axes", "resources", "max_concurrent",
            "claims", "search", "selection")


@dataclass(frozen=True)
class Resources:
    """What one trial (or base build) reserves from Ray; fractions share a GPU between trials (`gpu: 0.125`: 8 trials
    run on one GPU at once, as far as cpu and max_concurrent allow)."""

    cpu: float = 1.0
    gpu: float = 0.0
    processes: int = 1  # > 1: the trial runs `accelerate launch` with this many processes (one per GPU)


@dataclass
class Trial:
    name: str  # t<index>-<axes>: folder name, Ray trial name and MLflow run name
    overrides: list[str]  # load_config overrides (absolute paths, tracking URI and seed included)
    axes: dict[str, Any]  # axis → value as the resolved config holds it (what the report shows), seed included
    grids: list[str]  # the grids this trial belongs to (a shared default point belongs to several)
    base_key: Optional[str]  # the cached base it fine-tunes; None when the trial names its own base_checkpoint


@dataclass
class Sweep:
    name: str
    path: Path  # the sweep file
    base_config: Path  # absolute
    experiment: str
    output_dir: Path  # absolute: holds sweeps/<name>/<timestamp>/ and base_cache/
    tracking_uri: str
    resources: Resources
    max_concurrent: Optional[int]
    grids: dict[str, list[str]]  # grid → its axis names
    trials: list[Trial] = field(default_factory=list)
    claims: Optional[Claims] = None  # the claims table's definition (tune/claims.py), if the file has one
    search: Optional[Search] = None  # how searched axes are drawn and trials stopped (search.py), if any
    selection: Optional[str] = None  # the file's selection rule (finetune.select of every trial), if it sets one
    space: dict[str, dict[str, dict]] = field(default_factory=dict)  # grid → searched axis → its distribution
    chosen: Optional[dict[str, dict[str, Any]]] = None  # grid → the setting a search chose (--chosen), if given

    def trial_dicts(self) -> list[dict[str, Any]]:
        return [asdict(t) for t in self.trials]


def load_sweep(path: str | Path, cli_overrides: list[str] | tuple[str, ...] = (),
               seeds: Optional[list[int]] = None, only: Optional[list[str]] = None,
               chosen: Optional[dict[str, dict[str, Any]]] = None) -> Sweep:
    """Read and validate a sweep file, building every trial's config (UserError on any problem). `seeds`
    replaces the file's seed list (adding seeds to a study: a new sweep of the same grids, whose report can
    be merged with the earlier one's by `--report DIR DIR`); `only` keeps these of its grids, and the claims
    that their trials measure; `chosen` (grid → setting, what a finished search chose) fixes each searched
    grid's searched axes at one setting instead of drawing them."""
    path = Path(path)
    data = _read_yaml(path)
    if seeds is not None:
        data = {**data, "seeds": seeds}
    if only is not None:
        data = {**data, "grids": _only_grids(path, data, only)}
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r}{suggest(unknown[0], list(TOP_KEYS))}")
    if "base_config" not in data:
        raise UserError(f"{path}: missing 'base_config' (the experiment YAML every trial starts from)")
    base_config = Path(str(data["base_config"])).resolve()
    if not base_config.is_file():
        raise UserError(f"{path}: base_config {str(data['base_config'])!r} not found (paths are relative to the "
                        "working directory; run from the repository root)")
    search = parse_search(path, data["search"]) if "search" in data else None
    rule = parse_selection(path, data["selection"]) if "selection" in data else None
    # The file's rule keeps every trial's epoch (before the command line's overrides, which may still change it).
    common = [*_mapping_overrides(path, data.get("overrides") or {}), *([f"finetune.select={rule}"] if rule else []),
              *cli_overrides]
    base = _context(path, "overrides", lambda: load_config(base_config, common))
    if not base.tracking.enabled:
        raise UserError(f"{path}: a sweep records its trials in MLflow; remove tracking.enabled=false")
    experiment, uri = str(data.get("experiment") or base.experiment), _absolute_uri(tracking_uri(base))
    common += [f"experiment={json.dumps(experiment)}", f"tracking.uri={json.dumps(uri)}"]
    grids = _grids(path, data)
    space = {grid: {a: v for a, v in axes.items() if is_distribution(v)} for grid, axes in grids.items()}
    space = {grid: axes for grid, axes in space.items() if axes}
    if space and search is None:
        grid = next(iter(space))
        raise UserError(f"{path}: grid {grid!r} gives {next(iter(space[grid]))!r} a distribution, which needs a "
                        "'search:' section (e.g. search: {num_samples: 8}); or give it a list of values")
    for grid in space:  # a setting is chosen per grid: a second value of a grid axis would share one choice
        several = [a for a, v in grids[grid].items() if not is_distribution(v) and len(v) > 1]
        if several:
            raise UserError(f"{path}: grid {grid!r} searches {', '.join(space[grid])} and lists {len(grids[grid][several[0]])} "
                            f"values of {several[0]!r}: a search chooses one setting per grid, so give each value of "
                            f"{several[0]!r} a grid of its own (YAML anchors keep them short)")
    unknown = sorted(set(chosen or {}) - set(space))
    if unknown:
        raise UserError(f"--chosen: grid {unknown[0]!r} is not a searched grid of {path}")
    sweep = Sweep(
        name=_slug(str(data.get("name") or path.stem)), path=path.resolve(), base_config=base_config,
        experiment=experiment, output_dir=Path(base.output_dir).resolve(), tracking_uri=uri,
        resources=_resources(path, data.get("resources") or {}), max_concurrent=_max_concurrent(path, data),
        grids={name: list(axes) for name, axes in grids.items()}, search=search, selection=rule, space=space,
        chosen=chosen,
    )
    sweep.trials = _expand(sweep, grids, _seeds(path, data, base.seed), common)
    if "claims" in data:
        sweep.claims = parse_claims(str(path), data["claims"])
    if sweep.claims is not None and space and not chosen:  # a search's draws: many settings per row, no claim yet
        sweep.claims = None
    if sweep.claims is not None:
        if only is not None:  # the claims of the grids left out have no trials here
            sweep.claims = dataclasses.replace(sweep.claims, claims=[
                c for c in sweep.claims.claims if measured(sweep.claims, c, sweep.trials, str(path))])
        check_claims(sweep.claims, sweep.trials, str(path))  # the chosen settings: one per row and regime
    return sweep


def _only_grids(path: Path, data: dict[str, Any], only: list[str]) -> dict[str, Any]:
    """The grids of the file named in `only` (--grids), in the file's order."""
    grids = data.get("grids")
    if not isinstance(grids, dict):
        raise UserError(f"--grids: {path} has no named grids ('grids:'); run it whole")
    unknown = [name for name in only if name not in grids]
    if unknown:
        raise UserError(f"--grids: {path} has no grid {unknown[0]!r}{suggest(unknown[0], [str(g) for g in grids])}")
    return {name: axes for name, axes in grids.items() if name in only}


def is_base_key(key: str) -> bool:
    """Whether a config key (or a whole section, e.g. `data`) changes the base model that stages 0–2 train."""
    section = key.split(".")[0]
    return ((section in ("data", "model", "pretrain", "base", "probe") and key not in _DATA_LOADER_ONLY)
            or key in _BASE_TOP_LEVEL)


def base_fields(cfg: Config, stage: str = "probe") -> dict[str, Any]:
    """The config fields that define the model a stage of `CACHED_STAGES` ends with: `probe`, the base (stages
    0–2); `base`, stage 1's M (no stage-2 key); `pretrain`, stage 0's θ (its section and what it reads: not the
    seed, the run's data or stages 1–2). Fine-tuning, output and tracking keys are left out, and so is the pretrain
    section, but for its `epochs` of 0, where stage 0 does not run."""
    fields = {key: value for key, value in cfg.flat().items() if is_base_key(key)}
    if cfg.pretrain.epochs == 0:
        fields = {key: value for key, value in fields.items() if not key.startswith("pretrain.") or
                  key == "pretrain.epochs"}
    if stage == "pretrain":
        return {key: value for key, value in fields.items() if key.startswith("pretrain.") or key in _STAGE_ZERO_READS}
    if stage == "base":
        return {key: value for key, value in fields.items() if not key.startswith(_STAGE_TWO_ONLY)}
    return fields


def base_key(cfg: Config, stage: str = "probe") -> str:
    """The name of a stage's model in the sweep's base cache: a hash of exactly `base_fields(cfg, stage)`."""
    return hashlib.sha256(json.dumps(base_fields(cfg, stage), sort_keys=True).encode()).hexdigest()[:16]


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"sweep file {str(path)!r} not found (pass an existing YAML file to --config)")
    try:
        data = yaml.safe_load(path.read_text())
    except Exception as err:  # noqa: BLE001 - PyYAML raises more than YAMLError on bad input (not UTF-8, too)
        raise UserError(f"sweep file {str(path)!r} is not valid YAML: {first_line(err)}") from None
    if not isinstance(data, dict):
        raise UserError(f"sweep file {str(path)!r} must hold a mapping of keys, not {type(data).__name__}")
    return data


def _context(path: Path, where: str, build):
    """Call `build`, prefixing a UserError with the sweep file and the part of it being built."""
    try:
        return build()
    except UserError as err:
        raise UserError(f"{path}: {where}: {err}") from None


def _mapping_overrides(path: Path, overrides: Any) -> list[str]:
    if not isinstance(overrides, dict):
        raise UserError(f"{path}: 'overrides' must map config keys to values, e.g. {{finetune.epochs: 1}}")
    # JSON is YAML, so load_config parses each value back to exactly what the file held.
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]


def _pinned_paths(cfg: Config) -> list[str]:
    """Overrides that pin relative paths to the driver's working directory: Ray workers may run elsewhere.

    Fields read through `flat()`, so that a key another release lacks is skipped rather than an error.
    """
    flat, out = cfg.flat(), []
    for key, always in _PATHS.items():
        value = flat.get(key)
        if value and not Path(value).is_absolute() and (always or Path(value).exists()):
            out.append(f"{key}={json.dumps(str(Path(value).resolve()))}")
    if flat.get("data.name") == "lfw" and "data.split_file" in flat and not flat["data.split_file"]:
        # One person split for the whole sweep where a CLI run would put it, not a fresh one per trial folder.
        split = Path(cfg.output_dir).resolve() / cfg.experiment / "lfw_split.json"
        out.append(f"data.split_file={json.dumps(str(split))}")
    return out


def _absolute_uri(uri: str) -> str:
    """`sqlite:///mlflow.db` is relative to each process's working directory; make it one file for all."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri.removeprefix(prefix)).is_absolute():
        return prefix + str(Path(uri.removeprefix(prefix)).resolve())
    return uri


def _resources(path: Path, data: Any) -> Resources:
    if not isinstance(data, dict) or set(data) - {"cpu", "gpu", "processes"}:
        raise UserError(f"{path}: 'resources' takes cpu, gpu and processes, e.g. {{cpu: 2, gpu: 0.5}}; got {data!r}")
    try:
        res = Resources(cpu=float(data.get("cpu", 1)), gpu=float(data.get("gpu", 0)),
                        processes=int(data.get("processes", 1)))
    except (TypeError, ValueError):
        raise UserError(f"{path}: 'resources' values must be numbers; got {data!r}") from None
    if res.cpu <= 0 or res.processes < 1:
        raise UserError(f"{path}: 'resources' needs cpu > 0 and processes >= 1; got {data!r}")
    if not (res.gpu == 0 or 0 < res.gpu <= 1 or (res.gpu > 1 and res.gpu.is_integer())):
        # Ray schedules fractions of one GPU only: 1.5 GPUs is no device count a trial can hold.
        raise UserError(f"{path}: 'resources': gpu is 0 (no GPU), a fraction of one GPU up to 1 (gpu: 0.125 packs "
                        f"8 trials on a GPU) or a whole number of GPUs; got gpu: {data.get('gpu')!r}")
    if res.processes > 1 and 0 < res.gpu < res.processes:
        raise UserError(f"{path}: 'resources': {res.processes} processes need {res.processes} GPUs (one each), "
                        f"or gpu: 0 for CPU processes; got gpu: {res.gpu}")
    return res


def _max_concurrent(path: Path, data: dict[str, Any]) -> Optional[int]:
    value = data.get("max_concurrent")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise UserError(f"{path}: 'max_concurrent' must be a positive integer (or absent: as many as fit); got {value!r}")
    return value


def _seeds(path: Path, data: dict[str, Any], default: int) -> list[int]:
    seeds = data.get("seeds", [default])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise UserError(f"{path}: 'seeds' must be a non-empty list of integers, e.g. [0, 1, 2]; got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"{path}: 'seeds' lists a seed twice: {seeds}")
    return seeds


def _grids(path: Path, data: dict[str, Any]) -> dict[str, dict[str, list]]:
    if ("grids" in data) == ("axes" in data):
        raise UserError(f"{path}: give exactly one of 'grids' (named grids of axes) or 'axes' (a single grid)")
    grids = data["grids"] if "grids" in data else {"grid": data["axes"]}
    if not isinstance(grids, dict) or not grids:
        raise UserError(f"{path}: 'grids' must map grid names to mappings of axes")
    for name, axes in grids.items():
        if not isinstance(axes, dict) or not axes:
            raise UserError(f"{path}: grid {name!r} must map axis names to lists of values, e.g. {{alpha: [0.3, 0.7]}}")
        for axis, values in axes.items():
            _check_axis(path, str(name), str(axis), values)
            if is_distribution(values):
                check_distribution(f"{path}: grid {name!r}: axis {axis!r}", values)
    return {str(n): {str(a): v for a, v in axes.items()} for n, axes in grids.items()}


def _check_axis(path: Path, grid: str, axis: str, values: Any) -> None:
    if axis not in AXES and "." not in axis and axis not in Config.__dataclass_fields__:
        raise UserError(f"{path}: grid {grid!r}: unknown axis {axis!r}{suggest(axis, list(AXES))}; "
                        "or name a dotted config key such as finetune.pgd_steps")
    root = AXES.get(axis, axis).split(".")[0]
    if root in RESERVED:
        hint = "list seeds under the top-level 'seeds'" if root == "seed" else "the sweep sets it for every trial"
        raise UserError(f"{path}: grid {grid!r}: axis {axis!r} cannot vary per trial ({hint})")
    if not is_distribution(values) and (not isinstance(values, list) or not values):
        raise UserError(f"{path}: grid {grid!r}: axis {axis!r} needs a non-empty list of values (or a distribution "
                        f"to search, e.g. {{loguniform: [1.0e-4, 1.0e-2]}}); got {values!r}")


def _axis_overrides(axis: str, value: Any) -> list[str]:
    key = AXES.get(axis, axis)
    if isinstance(value, dict):  # several keys of one section, e.g. a dataset's name and root
        return [f"{key}.{k}={json.dumps(v)}" for k, v in value.items()]
    return [f"{key}={json.dumps(value)}"]


def _axis_value(axis: str, value: Any, cfg: Config) -> Any:
    """The axis's value as the resolved config holds it, so `0.5` and `0.50` are one setting."""
    flat, key = cfg.flat(), AXES.get(axis, axis)
    if isinstance(value, dict):
        return {k: flat[f"{key}.{k}"] for k in value}
    return flat[key]


def _expand(sweep: Sweep, grids: dict[str, dict[str, list]], seeds: list[int], common: list[str]) -> list[Trial]:
    """Every grid's cross product × seeds; trials whose resolved configs are equal are merged."""
    by_config: dict[str, Trial] = {}
    for grid, all_axes in grids.items():
        axes = {a: v for a, v in all_axes.items() if a not in sweep.space.get(grid, {})}
        if grid not in sweep.space:
            draws = [{}]
        elif sweep.chosen and grid in sweep.chosen:
            draws = [sweep.chosen[grid]]
        else:
            draws = draw(grid, sweep.space[grid], sweep.search)
        for combo, drawn in itertools.product(itertools.product(*axes.values()), draws):
            for seed in seeds:
                settings = {**dict(zip(axes, combo)), **drawn}
                overrides = [*common, *(o for a, v in settings.items() for o in _axis_overrides(a, v)), f"seed={seed}"]
                where = f"grid {grid!r}, trial {json.dumps(settings)}"
                cfg = _context(sweep.path, where, lambda: load_config(sweep.base_config, overrides))
                pins = _pinned_paths(cfg)
                if pins:
                    overrides += pins
                    cfg = load_config(sweep.base_config, overrides)
                fingerprint = json.dumps(cfg.to_dict(), sort_keys=True)
                trial = by_config.setdefault(fingerprint, Trial("", overrides, {}, [],
                                                                None if cfg.base_checkpoint else base_key(cfg)))
                trial.axes.update({a: _axis_value(a, v, cfg) for a, v in settings.items()})
                trial.axes.pop("seed", None)
                trial.axes["seed"] = seed  # last, after the axes of every grid the trial belongs to
                if grid not in trial.grids:
                    trial.grids.append(grid)
    trials = list(by_config.values())
    for index, trial in enumerate(trials):
        trial.name = f"t{index:03d}-" + _slug("-".join(f"{a}={_short(v)}" for a, v in trial.axes.items()))
    return trials


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "+".join(map(str, value))
    if isinstance(value, dict):
        return "+".join(str(v) for v in value.values())
    return str(value)


def _slug(text: str) -> str:
    """A file-system- and MLflow-safe name."""
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", text)[:120]
