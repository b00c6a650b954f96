"""One typed config per run: dataclass defaults ← YAML file ← `key=value` overrides.

Method hyper-parameters default to docs/method.md (α = 0.5, E = {0, 0.001, 0.01}, FGSM, ascending order,
frozen attack model, Adam 1e-3, clipping at 1.0). Sizes (dataset, backbone, epochs, image size) default
to the CPU demo on the generated dataset, so that a run with no flags finishes in minutes; the CelebA and
LFW presets in `configs/` set the paper's sizes (ResNet-18, 50 base epochs, 10 fine-tuning epochs).

Every error is a `UserError` naming the key and, where one exists, the nearest valid key or value.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from . import mitigations  # noqa: F401  registers the rows beside ASAC in rows.MODES (after rows.py's own)
from .attacks import ATTACKS
from .curriculum import ORDERS
from .data.datasets import DATASETS, synthetic_arguments
from .data.faces import BAD_IMAGE_POLICIES
from .data.synthetic import check_arguments as check_generator_arguments
from .errors import UserError
from .models import BACKBONES, PROTECTED_CLASSIFIERS
from .registry import suggest
from .rows import MODES


@dataclass
class DataConfig:
    name: str = "synthetic"  # which dataset (synthetic: generated on first use)
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
    synthetic_seed: int = 0  # generated dataset only: its random seed (>= 0)
    synthetic_beard_strength: float = 1.0  # contrast of the protected cue (the beard) in (0, 1]; 1: full, dark
    synthetic_smile_floor: float = 0.0  # strength of the target cue: smile depths drawn from U(floor, 1) of the full depth, in [0, 1)
    synthetic_train_twins: bool = False  # also write each train image's Male-flipped twin (the oracle_counterfactual row)


@dataclass
class ModelConfig:
    backbone: str = "small_cnn"  # the backbone θ (models.BACKBONES)
    weights: Optional[str] = None  # None: random init; "imagenet": torchvision's file in the torch cache; or a path
    protected_classifier: str = "probe"  # probe: C is a linear head on M's backbone (the paper); independent: C has its own backbone, trained in stage 2


@dataclass
class StageConfig:
    """Optimisation of one training stage (Adam, docs/method.md Defaults)."""

    epochs: int = 10  # passes over the train split
    batch_size: int = 64  # images per optimizer step over all processes (global; each of W ranks takes batch_size / W)
    lr: float = 1e-3  # Adam learning rate


@dataclass
class FinetuneConfig:
    mode: str = "asac"  # stage-3 training (rows.MODES): ASAC, a comparator, or none (base)
    epochs: int = 2  # passes over the train split
    batch_size: int = 64  # images per minibatch over all processes (global; each of W ranks makes the ASACs of k = batch_size / W)
    lr: float = 1e-3  # Adam learning rate
    alpha: float = 0.5  # weight of the clean term in α·CE(x) + (1 − α)·CE(x')
    eps: list[float] = field(default_factory=lambda: [0.001, 0.01])  # E = {0} ∪ eps (eps_mode fixed)
    eps_mode: str = "fixed"  # fixed: use eps; calibrated: one ε per attack_success_targets, chosen before stage 3
    attack_success_targets: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # shares of ASACs that fool C
    calibration_images: int = 512  # training images (a fixed sample) on which calibrated ε are chosen
    attack: str = "fgsm"  # how ASACs are made (fgsm: one gradient for all ε; pgd: finetune.pgd_steps)
    pgd_steps: int = 10  # PGD iterations (attack pgd and the adv_augment comparator)
    order: str = "ascending"  # curriculum order of the difficulty scores (random: no curriculum)
    attack_model: str = "frozen"  # frozen: snapshot of C at stage-3 start; live: current θ
    adv_eps: float = 0.01  # the single PGD ε of the adv_augment comparator
    channels_last: bool = True  # stage-3 images in NHWC layout: same math, faster on CPU (BENCHMARKS.md)
    batchnorm: str = "train"  # train: each chunk is a train-mode batch (the paper); frozen: keep the base's statistics
    select: str = "last"  # last: keep the last epoch (the paper); balanced_valid: best balanced-valid accuracy
    steps: str = "per_chunk"  # per_chunk: one optimizer step per chunk of k entries, |E| per minibatch (the default); per_minibatch: one step on all of a minibatch's entries, every row alike
    fixed_chunks: bool = False  # true: each chunk's forward holds all k clean images and all its entries (fixed shape: no host read per minibatch, CUDA-graph-able), so batch-norm statistics differ from the default's exact chunk (BENCHMARKS.md, section 9)
    compile: bool = False  # torch.compile the model of the training steps (forward and backward; attacks and scoring stay eager): off until measured on a GPU (docs/performance.md)


@dataclass
class GanConfig:
    """The generator of the gan_augment comparator (gan.py): a DCGAN trained on the train split, cached."""

    checkpoint: Optional[str] = None  # a generator .safetensors written by `python -m distributed_asac.gan train`; None: train one (cached)
    latent_dim: int = 64  # size of the latent z ~ N(0, I)
    width: int = 16  # channels of the generator's last hidden layer (×2 per layer toward z) and the critic's first
    epochs: int = 10  # passes of GAN training over the train split
    batch_size: int = 16  # images per GAN training step (small: more steps per pass, which the GAN needed)
    lr: float = 2e-4  # Adam learning rate of both networks (β = 0.5, 0.999: DCGAN's)
    latents: int = 4096  # sampled latents, labelled by the base's two heads, that fit the latent hyperplanes


@dataclass
class GroupDroConfig:
    """The group_dro row (Sagawa et al. 2020, Algorithm 1): online weights q over the (target, protected) groups."""

    eta: float = 0.01  # η, step size of the group weights q_g ← q_g·exp(η·loss_g) (the paper's code: 0.01); > 0


@dataclass
class JttConfig:
    """The jtt row (Liu et al. 2021): the base's mistakes on train are drawn λ times as often."""

    upweight: float = 50.0  # λ, how many times as often an image the base gets wrong is drawn (the paper's CelebA λ_up); >= 1


@dataclass
class DfrConfig:
    """The dfr row (Kirichenko et al. 2023): the target head refit, backbone frozen, on a group-balanced subset of valid."""

    c_grid: list[float] = field(default_factory=lambda: [1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01])  # inverse ℓ1 strengths C tried (the DFR code's); the best by worst-group accuracy on half of valid
    retrains: int = 20  # logistic regressions on fresh balanced draws of valid, their weights averaged (the DFR code's 20)


@dataclass
class AnalysisConfig:
    """Per-model analysis on the first test images (analysis.py); 0 images turns a part off."""

    robustness_eps: list[float] = field(default_factory=lambda: [0.005, 0.01, 0.02, 0.05])  # ε of the robustness curve; 0 is added
    robustness_images: int = 256  # test images of the robustness curve
    ig_images: int = 32  # test images explained with Integrated Gradients
    ig_steps: int = 32  # Integrated Gradients path steps


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    enabled: bool = True  # false: no MLflow logging at all
    lock_wait_s: float = 60.0  # how long a write waits for a store another process keeps locked, then the run stops


@dataclass
class RegistryConfig:
    """The MLflow Model Registry: each row's chosen model registered as a version (docs/mlflow.md)."""

    enabled: bool = True  # false: register nothing (each finished model is still an MLflow Model of its run)
    name: str = "{experiment}-{row}"  # the registered model of a row: {experiment} and {row} are filled in
    uri: Optional[str] = None  # the registry's store; None: $MLFLOW_REGISTRY_URI, else the tracking store


@dataclass
class Config:
    experiment: str = "demo"  # MLflow experiment and run-folder name
    seed: int = 0  # the seed of one run (stages 1–3): python, numpy and torch (rank r uses seed + r); >= 0
    seeds: Optional[list[int]] = None  # the comparison (python -m distributed_asac.demo) runs once per seed; None: [seed]
    output_dir: str = "runs"  # run folders go to <output_dir>/<experiment>/<timestamp>
    base_checkpoint: Optional[str] = None  # a folder written by stages 1–2; None: train them first
    resume: Optional[str] = None  # "latest" (newest unfinished run of the experiment) or a run folder: continue it
    grad_clip: float = 1.0  # max gradient norm of every step (> 0)
    sync_batchnorm: bool = True  # batch norm in training over the global batch (all ranks), not each rank's share
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam β1, β2
    adam_eps: float = 1e-8  # Adam ε
    data: DataConfig = field(default_factory=DataConfig)  # the dataset and its loading
    model: ModelConfig = field(default_factory=ModelConfig)  # the shared backbone θ
    base: StageConfig = field(default_factory=lambda: StageConfig(epochs=8))  # stage 1: M (θ, ρ) on the target
    probe: StageConfig = field(default_factory=lambda: StageConfig(epochs=3))  # stage 2: C (φ) on the protected attribute, θ frozen
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # stage 3: ASAC fine-tuning or a comparator
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)  # robustness curve and Integrated Gradients
    gan: GanConfig = field(default_factory=GanConfig)  # the generator of the gan_augment row
    group_dro: GroupDroConfig = field(default_factory=GroupDroConfig)  # the group_dro row's group weights
    jtt: JttConfig = field(default_factory=JttConfig)  # the jtt row's upweighting of the base's mistakes
    dfr: DfrConfig = field(default_factory=DfrConfig)  # the dfr row's last-layer retraining
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # MLflow
    registry: RegistryConfig = field(default_factory=RegistryConfig)  # the MLflow Model Registry

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """{'finetune.alpha': 0.5, ...}: what MLflow logs as params."""
        return _flatten(self.to_dict())


ATTACK_MODELS = ("frozen", "live")
BATCHNORM_MODES = ("train", "frozen")
SELECTION_RULES = ("last", "balanced_valid")
STEP_RULES = ("per_chunk", "per_minibatch")
EPS_MODES = ("fixed", "calibrated")


class RepeatedKey(yaml.YAMLError):
    """A key that one mapping of a YAML file holds twice."""


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader, except that a key repeated in one mapping is an error: PyYAML keeps the last value
    silently, so a second `finetune:` block would drop every key of the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        places: dict[Any, tuple[int, int]] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges on purpose
                continue
            key, mark = self.construct_object(key_node, deep=True), key_node.start_mark
            place = (mark.line + 1, mark.column + 1)
            try:
                if key in places:
                    (line, column), first = place, places[key]
                    where = (f"line {first[0]} and line {line}" if first[0] != line
                             else f"line {line}, columns {first[1]} and {column}")  # a flow mapping: {a: 1, a: 2}
                    raise RepeatedKey(f"key {key!r} appears twice, at {where}")
                places[key] = place
            except TypeError:  # an unhashable key: the constructor below names it
                continue
        return super().construct_mapping(node, deep)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at `path`, then `key=value` overrides; validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {str(path)!r} not found (pass an existing YAML file to --config)")
        try:
            source = path.read_text()
            data = yaml.load(source, Loader=UniqueKeyLoader)
            # every scalar as written (BaseLoader resolves no types): a name field keeps `experiment: 0x1F` as
            # "0x1F", which the load above reads as 31
            written_data = yaml.load(source, Loader=yaml.BaseLoader)
        except RepeatedKey as err:
            raise UserError(f"config file {str(path)!r}: {err}; the second would silently replace the first: "
                            "keep one (merge the two)") from None
        except yaml.YAMLError as err:
            raise UserError(f"config file {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
        except UnicodeDecodeError as err:
            raise UserError(f"config file {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start}); pass "
                            "a YAML file to --config") from None
        data = {} if data is None else data  # an empty file (or only comments) sets nothing
        if not isinstance(data, dict):
            raise UserError(f"config file {str(path)!r} must hold a mapping of keys (e.g. `finetune:` then "
                            f"`  alpha: 0.3`), not a {type(data).__name__} ({data!r:.40})")
        as_written = _flatten(written_data) if isinstance(written_data, dict) else {}
        for key, value in _flatten(data).items():
            written = as_written.get(key)
            _set(cfg, key, value, written if isinstance(written, str) else None)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form key=value (e.g. finetune.alpha=0.3)")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        _set(cfg, key.strip(), value, text)
    validate(cfg)
    return cfg


def load_cli_config(path: Optional[str], overrides: list[str]) -> Config:
    """`load_config` of what a command gives, each key given once (`check_given_once`)."""
    check_given_once(overrides)
    return load_config(path, overrides)


def check_given_once(overrides: list[str]) -> None:
    """Refuse a key given twice on a command line (the last would silently win). Programs layer overrides on
    purpose (a sweep's trial adds its own output_dir), so only commands check."""
    given: dict[str, str] = {}
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in given:
            raise UserError(f"config key {key!r} is given twice on the command line ({given[key]!r} and {item!r}); "
                            "give it once")
        given[key] = item


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict()` output (e.g. the config.yaml saved beside a checkpoint)."""
    cfg = Config()
    for key, value in _flatten(data).items():
        _set(cfg, key, value)
    validate(cfg)
    return cfg


def read_saved_config(path: Path) -> Config:
    """A config.yaml that `save_config` wrote (beside a run or a checkpoint), rebuilt and validated; a damaged one
    is a UserError whose message is the first line of the reason."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError((str(err).strip().splitlines() or [type(err).__name__])[0]) from None
    if not isinstance(data, dict):
        raise UserError(f"it holds a {type(data).__name__}, not a mapping of keys")
    return config_from_dict(data)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def choices() -> dict[str, list[str]]:
    """The valid names of every key that takes one of a fixed set of names (validation and --help)."""
    return {"data.name": DATASETS.names(), "model.backbone": BACKBONES.names(), "finetune.attack": ATTACKS.names(),
            "finetune.order": ORDERS.names(), "finetune.mode": MODES.names(),
            "finetune.attack_model": list(ATTACK_MODELS), "data.on_bad_image": list(BAD_IMAGE_POLICIES),
            "finetune.batchnorm": list(BATCHNORM_MODES), "finetune.select": list(SELECTION_RULES),
            "finetune.eps_mode": list(EPS_MODES), "finetune.steps": list(STEP_RULES),
            "model.protected_classifier": list(PROTECTED_CLASSIFIERS)}


SEED_KEYS = ("seed", "data.split_seed", "data.synthetic_seed")
MAX_SEED = 2**31 - 1  # numpy seeds must lie in [0, 2**32); rank r adds r to `seed`


def validate(cfg: Config) -> None:
    """Range and name checks that types alone cannot express (non-finite floats are refused by `_coerce`)."""
    for key, valid in choices().items():
        value = _get(cfg, key)
        if value not in valid:
            raise UserError(f"config key {key!r}: unknown value {value!r}{suggest(value, list(valid))}")
    for target in cfg.finetune.attack_success_targets:
        if not 0.0 < target < 1.0:
            raise UserError(f"config key 'finetune.attack_success_targets': {target} is outside (0, 1); each target "
                            "is the share of ASACs that should fool C, e.g. [0.25, 0.5, 0.75]")
    if cfg.finetune.eps_mode == "calibrated" and not cfg.finetune.attack_success_targets:
        raise UserError("config key 'finetune.attack_success_targets' is empty but finetune.eps_mode is calibrated; "
                        "give at least one target share, e.g. [0.5]")
    for key in ("finetune.eps", "analysis.robustness_eps"):
        for eps in _get(cfg, key):
            if not 0.0 <= eps <= 1.0:
                raise UserError(f"config key {key!r}: {eps} is outside [0, 1] (ε is in pixel units of [0, 1] images)")
    if cfg.finetune.eps_mode == "fixed" and not any(eps > 0 for eps in cfg.finetune.eps):
        # E = {0} ∪ eps: with no ε > 0 an ASAC row is plain fine-tuning under another name.
        raise UserError(f"config key 'finetune.eps': {cfg.finetune.eps} holds no ε > 0, so ASAC fine-tuning would be "
                        "plain fine-tuning; give at least one, e.g. finetune.eps=[0.001,0.01] (0 is always added)")
    _in_range("finetune.adv_eps", cfg.finetune.adv_eps, 0.0, 1.0)
    _in_range("finetune.alpha", cfg.finetune.alpha, 0.0, 1.0)
    for key in ("data.image_size", "finetune.pgd_steps", "finetune.calibration_images", "base.batch_size",
                "probe.batch_size", "finetune.batch_size", "gan.latent_dim", "gan.width", "gan.epochs",
                "gan.batch_size"):
        _in_range(key, _get(cfg, key), 1, None)
    for key in ("base.epochs", "probe.epochs", "finetune.epochs", "data.num_workers",
                "analysis.robustness_images", "analysis.ig_images", "analysis.ig_steps"):
        _in_range(key, _get(cfg, key), 0, None)
    for stage in ("finetune",) if cfg.base_checkpoint else ("base", "probe", "finetune"):
        if _get(cfg, f"{stage}.epochs") == 0:  # the stage's model would be reported as if trained
            raise UserError(f"config key '{stage}.epochs': 0 epochs would train nothing and report the untrained "
                            f"model; set {stage}.epochs >= 1" + (" (or base_checkpoint= to skip stages 1–2)"
                                                                 if stage != "finetune" else ""))
    for key in SEED_KEYS:
        _in_range(key, _get(cfg, key), 0, MAX_SEED)
    if cfg.data.name == "synthetic":  # the generator's own checks, worded with the config keys
        check_generator_arguments(**synthetic_arguments(cfg.data), spell=_generator_key)
    _in_range("gan.latents", cfg.gan.latents, 8, None)  # a hyperplane needs latents of both classes
    for key in ("base.lr", "probe.lr", "finetune.lr", "gan.lr", "adam_eps", "grad_clip",  # grad_clip 0 would zero every gradient
                "tracking.lock_wait_s"):
        if _get(cfg, key) <= 0:
            raise UserError(f"config key {key!r}: must be > 0, got {_get(cfg, key)} (default {_get(Config(), key)})")
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
    if _attribute(cfg.data.target) == _attribute(cfg.data.protected):
        raise UserError(f"config keys 'data.target' and 'data.protected' name the same attribute "
                        f"({cfg.data.target!r} and {cfg.data.protected!r}); choose two, e.g. data.target=Smiling "
                        "data.protected=Male")
    _validate_mitigations(cfg)
    name = cfg.experiment
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
        # It names a folder under output_dir: a path there would write outside it.
        raise UserError(f"config key 'experiment': {name!r} is not a plain folder name; use letters, digits, "
                        "'-', '_' or '.', without '/' (e.g. experiment=smiling_resnet18)")


def _attribute(name: str) -> str:
    """An attribute name as the same attribute however spelled: `Smiling`, `smiling`, `SMILING_`."""
    return "".join(c for c in name.lower() if c.isalnum())


def _validate_mitigations(cfg: Config) -> None:
    """The keys of the rows beside ASAC (distributed_asac/mitigations/)."""
    if cfg.group_dro.eta <= 0:
        raise UserError(f"config key 'group_dro.eta': must be > 0, got {cfg.group_dro.eta} (the step size of the group "
                        "weights; default 0.01, Sagawa et al. 2020)")
    if cfg.jtt.upweight < 1:
        raise UserError(f"config key 'jtt.upweight': must be >= 1, got {cfg.jtt.upweight} (λ < 1 would draw the "
                        "base's mistakes less often than the rest; default 50, Liu et al. 2021)")
    if not cfg.dfr.c_grid or min(cfg.dfr.c_grid) <= 0:
        raise UserError(f"config key 'dfr.c_grid': need at least one C > 0, got {cfg.dfr.c_grid} "
                        "(default [1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01])")
    _in_range("dfr.retrains", cfg.dfr.retrains, 1, None)


def per_rank_batch(global_batch: int, key: str, processes: int) -> int:
    """Each rank's share of a global batch (`base.batch_size`, `probe.batch_size`, `finetune.batch_size` name the
    images of one optimizer step summed over all ranks, so a config is the same experiment at any world size)."""
    if global_batch % processes:
        raise UserError(f"config key {key!r}: the global batch {global_batch} does not divide among {processes} "
                        f"processes; set {key} to a multiple of {processes} (e.g. "
                        f"{max(processes, global_batch // processes * processes)})")
    return global_batch // processes


def check_batch_sizes(cfg: Config, train_size: int, processes: int, stages: tuple[str, ...]) -> None:
    """Refuse a batch size that gives no training step or that does not divide among the processes: batch sizes
    are global (each rank takes batch_size / processes) and the loaders drop the last incomplete batch, so a
    train split smaller than batch_size would train nothing and report an untrained model."""
    for stage in stages:
        key = f"{stage}.batch_size"
        per_rank_batch(_get(cfg, key), key, processes)
        if _get(cfg, key) > train_size:
            raise UserError(f"config key {key!r}: {_get(cfg, key)} is larger than the train split "
                            f"({train_size} images), which would give no training step; set {key} <= "
                            f"{train_size // processes * processes}")


# The config key of each argument of the generator (data/synthetic.py), for its error messages.
GENERATOR_KEYS = {"num_images": "data.synthetic_num_images", "bias": "data.synthetic_bias", "seed": "data.synthetic_seed",
                  "size": "data.image_size", "beard_strength": "data.synthetic_beard_strength",
                  "train_twins": "data.synthetic_train_twins", "smile_floor": "data.synthetic_smile_floor"}


def _generator_key(argument: str, value: Any) -> str:
    shown = value[0] if argument == "size" else value  # the generator draws image_size × image_size
    return f"config key {GENERATOR_KEYS[argument]!r}: {shown}"


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


def _set(cfg: Config, key: str, value: Any, text: Optional[str] = None) -> None:
    """Set `key` to `value`, checked against its type; `text` is the value as written (on a command line or in a
    YAML file), which a name field keeps."""
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
    if text is not None and value is not None and not isinstance(value, str) and _holds_text(hint_type):
        value = text  # a name as typed: YAML reads experiment=0x1F as 31 and data.target=yes as True
    setattr(obj, leaf, _coerce(key, value, hint_type))


def _holds_text(hint: Any) -> bool:
    """Whether a field's type is str or Optional[str]."""
    return hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                           and set(typing.get_args(hint)) == {str, type(None)})


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
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string; it is a float to everyone else
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        default = _get(Config(), key)
        raise UserError(f"config key {key!r}: {value} is not a finite number; give a finite value "
                        f"(default {default})")
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. an experiment named 2024
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise UserError(f"config key {key!r}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def describe_keys() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, meaning) of every config key, from the dataclasses: the meaning is the field's
    trailing `#` comment (a section's own line comes from its field in the parent), the valid names of a
    name-valued key are appended from its registry. Feeds --help; a test requires a meaning for every key."""
    valid = choices()
    rows: list[tuple[str, str, Any, str]] = []

    def walk(obj: Any, prefix: str) -> None:
        comments, hints = _field_comments(type(obj)), typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            key, value = f"{prefix}{f.name}", getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                rows.append((key, "section", None, comments.get(f.name, "")))
                walk(value, f"{key}.")
                continue
            meaning = comments.get(f.name, "")
            if key in valid:
                meaning += f" [{' | '.join(valid[key])}]"
            rows.append((key, _type_name(hints[f.name]), value, meaning.strip()))

    walk(Config(), "")
    return rows


def help_text() -> str:
    """The config keys as --help lists them (an argparse epilog)."""
    lines = ["config keys (in the --config YAML, nested by section, or as key=value; lists as [0.001,0.01]):"]
    for key, kind, default, meaning in describe_keys():
        if kind == "section":
            lines.append(f"\n {key}.*: {meaning}")
        else:
            shown = yaml.safe_dump(default, default_flow_style=True, width=1000).strip().removesuffix("\n...").strip()
            lines.append(f"  {key:30} {kind + ' = ' + shown:28} {meaning}")
    return "\n".join(lines)


def _field_comments(cls: type) -> dict[str, str]:
    """field name → the `#` comment at the end of its line in the class body."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    source = textwrap.dedent(inspect.getsource(cls))
    by_line = {tok.start[0]: tok.string.lstrip("#").strip()
               for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    body = ast.parse(source).body[0].body
    return {node.target.id: by_line[node.end_lineno] for node in body
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.end_lineno in by_line}


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return f"{_type_name(args[0])}|null"
    if typing.get_origin(hint) is list:
        return f"list[{_type_name(args[0])}]"
    return hint.__name__
