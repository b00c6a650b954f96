"""Range and name checks that types alone cannot express, each failure a `UserError` naming the key and, where
one exists, the nearest valid value; and the batch-size checks that need the train split's size."""

from __future__ import annotations

from typing import Any

from ..data.datasets import synthetic_arguments
from ..data.synthetic import check_arguments as check_generator_arguments
from ..data.synthetic_labels import ATTRIBUTES as SYNTHETIC_ATTRIBUTES
from ..errors import UserError
from ..registry import suggest
from .schema import Config, choices, get_key


SEED_KEYS = ("seed", "data.split_seed", "data.synthetic_seed", "pretrain.seed")
MAX_SEED = 2**31 - 1  # numpy seeds must lie in [0, 2**32); rank r adds r to `seed`


def validate(cfg: Config) -> None:
    """Range and name checks that types alone cannot express (non-finite floats are refused when loaded: `loading._coerce`)."""
    for key, valid in choices().items():
        value = get_key(cfg, key)
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
        for eps in get_key(cfg, key):
            if not 0.0 <= eps <= 1.0:
                raise UserError(f"config key {key!r}: {eps} is outside [0, 1] (ε is in pixel units of [0, 1] images)")
    if cfg.finetune.eps_mode == "fixed" and not any(eps > 0 for eps in cfg.finetune.eps):
        # E = {0} ∪ eps: with no ε > 0 an ASAC row is plain fine-tuning under another name.
        raise UserError(f"config key 'finetune.eps': {cfg.finetune.eps} holds no ε > 0, so ASAC fine-tuning would be "
                        "plain fine-tuning; give at least one, e.g. finetune.eps=[0.001,0.01] (0 is always added)")
    _in_range("finetune.adv_eps", cfg.finetune.adv_eps, 0.0, 1.0)
    _in_range("finetune.alpha", cfg.finetune.alpha, 0.0, 1.0)
    for key in ("data.image_size", "finetune.pgd_steps", "finetune.calibration_images", "base.batch_size",
                "probe.batch_size", "pretrain.batch_size", "finetune.batch_size", "gan.latent_dim", "gan.width", "gan.epochs",
                "gan.batch_size", "analysis.ig_steps"):  # IG with 0 steps failed only after stage 1 had trained
        _in_range(key, get_key(cfg, key), 1, None)
    for key in ("base.epochs", "probe.epochs", "finetune.epochs", "pretrain.epochs", "data.num_workers",
                "analysis.robustness_images", "analysis.ig_images"):
        _in_range(key, get_key(cfg, key), 0, None)
    for stage in ("finetune",) if cfg.base_checkpoint else ("base", "probe", "finetune"):
        if get_key(cfg, f"{stage}.epochs") == 0:  # the stage's model would be reported as if trained
            raise UserError(f"config key '{stage}.epochs': 0 epochs would train nothing and report the untrained "
                            f"model; set {stage}.epochs >= 1" + (" (or base_checkpoint= to skip stages 1–2)"
                                                                 if stage != "finetune" else ""))
    for key in SEED_KEYS:
        _in_range(key, get_key(cfg, key), 0, MAX_SEED)
    if cfg.data.name == "synthetic":  # the generator's own checks, worded with the config keys
        check_generator_arguments(**synthetic_arguments(cfg.data), spell=_generator_key)
    _in_range("gan.latents", cfg.gan.latents, 8, None)  # a hyperplane needs latents of both classes
    for key in ("base.lr", "probe.lr", "finetune.lr", "gan.lr", "pretrain.lr", "adam_eps", "grad_clip",  # grad_clip 0 would zero every gradient
                "tracking.lock_wait_s"):
        if get_key(cfg, key) <= 0:
            raise UserError(f"config key {key!r}: must be > 0, got {get_key(cfg, key)} (default {get_key(Config(), key)})")
    if cfg.finetune.weight_decay < 0:
        raise UserError(f"config key 'finetune.weight_decay': must be >= 0 (0: no penalty), got {cfg.finetune.weight_decay}")
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
    _validate_stage_zero(cfg)
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
                        "identification model's mistakes less often than the rest; default 50, Liu et al. 2021)")
    _in_range("jtt.identification_epochs", cfg.jtt.identification_epochs, 1, None)
    if cfg.dfr.c_grid is not None and (not cfg.dfr.c_grid or min(cfg.dfr.c_grid) <= 0):
        raise UserError(f"config key 'dfr.c_grid': need at least one C > 0, got {cfg.dfr.c_grid} "
                        "(default null: the DFR code's grid for the dataset)")
    _in_range("dfr.retrains", cfg.dfr.retrains, 1, None)


def _validate_stage_zero(cfg: Config) -> None:
    """The keys of stage 0 (pretrain.py), of the lower learning rate of a stage's backbone, and of a stage-1 start."""
    for key in ("base.backbone_lr_scale", "probe.backbone_lr_scale"):
        if get_key(cfg, key) < 0:
            raise UserError(f"config key {key!r}: {get_key(cfg, key)} is below 0; give the backbone's learning rate as "
                            f"a share of {key.split('.')[0]}.lr, >= 0 (0: frozen; 1: the heads' rate, the default)")
    if cfg.base_checkpoint and cfg.stage1_checkpoint:
        raise UserError("config keys 'base_checkpoint' and 'stage1_checkpoint' are both set: base_checkpoint skips "
                        "stages 1–2, stage1_checkpoint only stage 1; give one (base_checkpoint=null or "
                        "stage1_checkpoint=null)")
    if cfg.pretrain.epochs == 0:
        return
    if cfg.stage1_checkpoint:
        raise UserError("config key 'stage1_checkpoint' skips stages 0–1, but pretrain.epochs is "
                        f"{cfg.pretrain.epochs}; set pretrain.epochs=0 (and model.weights to the stage-0 file that "
                        "stage 1 started from, which an independent C starts from too)")
    attributes = cfg.pretrain.attributes
    unknown = [name for name in attributes if name not in SYNTHETIC_ATTRIBUTES]
    if unknown or not attributes or len(set(attributes)) != len(attributes):
        problem = (f"names an attribute the generator does not draw, {unknown[0]!r}" if unknown
                   else "is empty" if not attributes else f"lists an attribute twice ({attributes})")
        raise UserError(f"config key 'pretrain.attributes' {problem}; give the generated attributes θ learns in "
                        "stage 0, each once, e.g. [Smiling, Male]"
                        + suggest(unknown[0] if unknown else "", list(SYNTHETIC_ATTRIBUTES)))
    check_generator_arguments(cfg.pretrain.num_images, 0.5, cfg.pretrain.seed, (cfg.data.image_size,) * 2,
                              spell=_pretrain_key)
    if cfg.data.name == "synthetic" and cfg.pretrain.seed == cfg.data.synthetic_seed:
        raise UserError(f"config keys 'pretrain.seed' and 'data.synthetic_seed' are both {cfg.pretrain.seed}: stage 0 "
                        "would pretrain on the run's own faces (its test split included) under other labels; set "
                        f"pretrain.seed to another value, e.g. {cfg.data.synthetic_seed + 1}")


def _pretrain_key(argument: str, value: Any) -> str:
    """A generator argument of stage 0's set, worded as the config key that sets it."""
    key = {"num_images": "pretrain.num_images", "seed": "pretrain.seed"}.get(argument, GENERATOR_KEYS[argument])
    return f"config key {key!r}: {value[0] if argument == 'size' else value}"


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
        per_rank_batch(get_key(cfg, key), key, processes)
        if get_key(cfg, key) > train_size:
            raise UserError(f"config key {key!r}: {get_key(cfg, key)} is larger than the train split "
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
