"""One typed config per run: dataclass defaults ← YAML file ← `key=value` overrides.

Method hyper-parameters default to METHOD.md (α = 0.5, E = {0, 0.001, 0.01}, FGSM, ascending order,
frozen attack model, Adam 1e-3, clipping at 1.0). Sizes (dataset, backbone, epochs, image size) default
to the CPU demo on the generated dataset, so that a run with no flags finishes in minutes; the CelebA and
LFW presets in `configs/` set the paper's sizes (ResNet-18, 50 base epochs, 10 fine-tuning epochs).

Every error is a `UserError` naming the key and, where one exists, the nearest valid key or value.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import UserError
from .registry import suggest


@dataclass
class DataConfig:
    name: str = "synthetic"  # synthetic | celeba | lfw
    root: str = "data/synthetic"  # dataset folder (generated here when name == synthetic)
    target: str = "Smiling"  # attribute M predicts
    protected: str = "Male"  # attribute C predicts and ASACs flip
    image_size: int = 48  # square side in pixels after center-crop and resize (the CPU demo's; presets: 128)
    num_workers: int = 0  # DataLoader workers per process
    cache_dir: Optional[str] = None  # a preprocessed uint8 cache (built once, memory-mapped); None: decode JPEGs
    on_bad_image: str = "error"  # error: name the corrupt file and stop; skip: leave it out, count it, log it
    split_file: Optional[str] = None  # LFW: person-disjoint split file; None: <output_dir>/<experiment>/lfw_split.json
    split_seed: int = 0  # LFW: seed of a newly drawn split
    synthetic_num_images: int = 6000  # generated dataset only
    synthetic_bias: float = 0.9  # P(target == protected) in train/valid of the generated dataset
    synthetic_seed: int = 0


@dataclass
class ModelConfig:
    backbone: str = "small_cnn"  # see models.BACKBONES
    weights: Optional[str] = None  # None: random init; "imagenet": torchvision's file in the torch cache; or a path


@dataclass
class StageConfig:
    """Optimisation of one training stage (Adam, METHOD.md Defaults)."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3


@dataclass
class FinetuneConfig:
    mode: str = "asac"  # asac | plain | adv_augment | base (see finetune.MODES)
    epochs: int = 2
    batch_size: int = 64  # k: images per process per minibatch
    lr: float = 1e-3
    alpha: float = 0.5  # weight of the clean term in α·CE(x) + (1 − α)·CE(x')
    eps: list[float] = field(default_factory=lambda: [0.001, 0.01])  # E = {0} ∪ eps
    attack: str = "fgsm"  # see attacks.ATTACKS
    pgd_steps: int = 10
    order: str = "ascending"  # see curriculum.ORDERS
    attack_model: str = "frozen"  # frozen: snapshot of C at stage-3 start; live: current θ
    adv_eps: float = 0.01  # the single PGD ε of the adv_augment comparator
    channels_last: bool = True  # stage-3 images in NHWC layout: same math, faster on CPU (BENCHMARKS.md)
    batchnorm: str = "train"  # train: each chunk is a train-mode batch (the paper); frozen: keep the base's statistics
    select: str = "last"  # last: keep the last epoch (the paper); balanced_valid: best balanced-valid accuracy


@dataclass
class AnalysisConfig:
    """Per-model analysis on the first test images (analysis.py); 0 images turns a part off."""

    robustness_eps: list[float] = field(default_factory=lambda: [0.005, 0.01, 0.02, 0.05])  # 0 is added
    robustness_images: int = 256
    ig_images: int = 32
    ig_steps: int = 32


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    enabled: bool = True


@dataclass
class Config:
    experiment: str = "demo"  # MLflow experiment and run-folder name
    seed: int = 0  # the seed of one run (stages 1–3)
    seeds: Optional[list[int]] = None  # the comparison (python -m distributed_asac.demo) runs once per seed; None: [seed]
    output_dir: str = "runs"
    base_checkpoint: Optional[str] = None  # a folder written by stages 1–2; None: train them first
    resume: Optional[str] = None  # "latest" (newest unfinished run of the experiment) or a run folder: continue it
    grad_clip: float = 1.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    base: StageConfig = field(default_factory=lambda: StageConfig(epochs=8))
    probe: StageConfig = field(default_factory=lambda: StageConfig(epochs=3))
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """{'finetune.alpha': 0.5, ...}: what MLflow logs as params."""
        return _flatten(self.to_dict())


DATASETS = ("synthetic", "celeba", "lfw")
ATTACK_MODELS = ("frozen", "live")
BAD_IMAGE_POLICIES = ("error", "skip")
BATCHNORM_MODES = ("train", "frozen")
SELECTION_RULES = ("last", "balanced_valid")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at `path`, then `key=value` overrides; validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {str(path)!r} not found (pass an existing YAML file to --config)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"config file {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {str(path)!r} must hold a mapping of keys, not {type(data).__name__}")
        for key, value in _flatten(data).items():
            _set(cfg, key, value)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form key=value (e.g. finetune.alpha=0.3)")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        _set(cfg, key.strip(), value)
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict()` output (e.g. the config.yaml saved beside a checkpoint)."""
    cfg = Config()
    for key, value in _flatten(data).items():
        _set(cfg, key, value)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def validate(cfg: Config) -> None:
    """Range and name checks that types alone cannot express."""
    # Imported here: the registries live beside the code they name, which itself imports config.
    from .attacks import ATTACKS
    from .curriculum import ORDERS
    from .finetune import MODES
    from .models import BACKBONES

    def check_name(key: str, value: str, valid: list[str] | tuple[str, ...]) -> None:
        if value not in valid:
            raise UserError(f"config key {key!r}: unknown value {value!r}{suggest(value, list(valid))}")

    check_name("data.name", cfg.data.name, DATASETS)
    check_name("model.backbone", cfg.model.backbone, BACKBONES.names())
    check_name("finetune.attack", cfg.finetune.attack, ATTACKS.names())
    check_name("finetune.order", cfg.finetune.order, ORDERS.names())
    check_name("finetune.mode", cfg.finetune.mode, MODES.names())
    check_name("finetune.attack_model", cfg.finetune.attack_model, ATTACK_MODELS)
    check_name("data.on_bad_image", cfg.data.on_bad_image, BAD_IMAGE_POLICIES)
    check_name("finetune.batchnorm", cfg.finetune.batchnorm, BATCHNORM_MODES)
    check_name("finetune.select", cfg.finetune.select, SELECTION_RULES)
    for key in ("finetune.eps", "analysis.robustness_eps"):
        for eps in _get(cfg, key):
            if not 0.0 <= eps <= 1.0:
                raise UserError(f"config key {key!r}: {eps} is outside [0, 1] (ε is in pixel units of [0, 1] images)")
    _in_range("finetune.adv_eps", cfg.finetune.adv_eps, 0.0, 1.0)
    _in_range("finetune.alpha", cfg.finetune.alpha, 0.0, 1.0)
    _in_range("data.synthetic_bias", cfg.data.synthetic_bias, 0.0, 1.0)
    for key in ("data.image_size", "finetune.pgd_steps", "base.batch_size", "probe.batch_size", "finetune.batch_size"):
        _in_range(key, _get(cfg, key), 1, None)
    for key in ("base.epochs", "probe.epochs", "finetune.epochs", "data.num_workers", "grad_clip",
                "analysis.robustness_images", "analysis.ig_images", "analysis.ig_steps"):
        _in_range(key, _get(cfg, key), 0, None)
    for key in ("base.lr", "probe.lr", "finetune.lr", "adam_eps"):
        if _get(cfg, key) <= 0:
            raise UserError(f"config key {key!r}: must be > 0, got {_get(cfg, key)}")
    if len(cfg.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.adam_betas):
        raise UserError(f"config key 'adam_betas': need two values in [0, 1), got {cfg.adam_betas}")
    if cfg.seeds is not None:
        if not cfg.seeds:
            raise UserError("config key 'seeds': the list is empty; give at least one seed, e.g. seeds=[0,1,2]")
        if len(set(cfg.seeds)) != len(cfg.seeds):
            twice = sorted({s for s in cfg.seeds if cfg.seeds.count(s) > 1})
            raise UserError(f"config key 'seeds': {twice} appear more than once; a seed counted twice would "
                            "shrink the intervals without new evidence — list each seed once")
        if min(cfg.seeds) < 0:
            raise UserError(f"config key 'seeds': seeds must be >= 0, got {min(cfg.seeds)}")
    if cfg.data.target == cfg.data.protected:
        raise UserError("config keys 'data.target' and 'data.protected' name the same attribute; choose two")


def _in_range(key: str, value: float, low: float | None, high: float | None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise UserError(f"config key {key!r}: {value} is out of range (must be {bounds})")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _all_keys(obj: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += _all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _set(cfg: Config, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    obj: Any = cfg
    for part in parents:
        child = getattr(obj, part, None) if dataclasses.is_dataclass(obj) else None
        if not dataclasses.is_dataclass(child):
            obj = None
            break
        obj = child
    if obj is None or leaf not in {f.name for f in dataclasses.fields(obj)} or dataclasses.is_dataclass(getattr(obj, leaf)):
        close = difflib.get_close_matches(key, _all_keys(cfg), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else " (see distributed_asac/config.py for the keys)"
        raise UserError(f"unknown config key {key!r}{hint}")
    hint_type = typing.get_type_hints(type(obj))[leaf]
    setattr(obj, leaf, _coerce(key, value, hint_type))


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # `finetune.eps=0.01` means the one-element list
        if not isinstance(value, list):
            raise UserError(f"config key {key!r}: expected a list like [0.001, 0.01], got {value!r}")
        return [_coerce(key, v, item_type) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. an experiment named 2024
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise UserError(f"config key {key!r}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value
