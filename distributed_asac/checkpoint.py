"""Model checkpoints as safetensors with the resolved config beside them (no pickle on load), each saying which
stage and row wrote it; the whole weights of a model whose parameters DeepSpeed ZeRO-3 partitioned across ranks;
and the checkpoints a run is given (`base_checkpoint`, `stage1_checkpoint`), checked against its config."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Optional

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import Config, read_saved_config, save_config
from .config.schema import get_key
from .errors import UserError, one_line
from .files import atomic_path
from .models import WRITTEN_BY, TwoHeadModel, create_model, protected_classifier

WEIGHTS = "model.safetensors"
PRETRAINED = "backbone.safetensors"  # what stage 0 writes: θ alone, a file for model.weights (pretrain.py)
CONFIG = "config.yaml"
# the models stages 1 and 2 write, and stage 0's backbone; every other model is a fine-tuned row (stage 3)
STAGES = {"pretrain": 0, "base": 1, "probe": 2}
# WRITTEN_BY, the weights' metadata key that records who wrote them, holds JSON ({"row": ..., "stage": ...}): one
# key, since safetensors writes several in a random order per process, and equal runs must write equal bytes.


def stage_of(name: str) -> int:
    """The stage that writes the model `name` (`base`, `probe`, or a row such as `asac_fgsm`)."""
    return STAGES.get(name, 3)


def save_checkpoint(state_dict: dict, cfg: Config, folder: Path, name: str) -> None:
    """Write `folder/model.safetensors` and `folder/config.yaml`, each atomically, so a crash never leaves a
    half-written checkpoint where a good one stood. The weights' metadata records the stage and the model `name`
    that wrote them, so that a folder given as base_checkpoint can be told for what it is (`check_base_folder`)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {key: t.detach().cpu().contiguous() for key, t in state_dict.items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={WRITTEN_BY: json.dumps({"row": name, "stage": stage_of(name)})})
    with atomic_path(folder / CONFIG) as tmp:
        save_config(cfg, tmp)


def save_pretrained(backbone_state: dict, cfg: Config, folder: Path) -> Path:
    """Write stage 0's θ (`folder/backbone.safetensors`, its metadata naming the backbone, so that a run of another
    backbone refuses it) and `folder/config.yaml`, each atomically; returns the weights' path."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {key: t.detach().cpu().contiguous() for key, t in backbone_state.items()}
    written_by = {"row": "pretrain", "stage": STAGES["pretrain"], "backbone": cfg.model.backbone}
    with atomic_path(folder / PRETRAINED) as tmp:
        save_file(tensors, str(tmp), metadata={WRITTEN_BY: json.dumps(written_by)})
    with atomic_path(folder / CONFIG) as tmp:
        save_config(cfg, tmp)
    return folder / PRETRAINED


def origin(folder: Path) -> Optional[str]:
    """The model (`base`, `probe` or a row) whose checkpoint `folder` holds: from its weights' metadata, or, for a
    checkpoint written before the metadata held it, from the one model its results.json reports; None when
    neither says (a damaged file is named by `load_checkpoint`)."""
    try:
        with safe_open(str(folder / WEIGHTS), "pt") as weights:
            row = json.loads((weights.metadata() or {}).get(WRITTEN_BY, "{}")).get("row")
    except Exception:  # noqa: BLE001 - any failure of the parse: no record to read here
        row = None
    if isinstance(row, str):
        return row
    try:
        reports = json.loads((folder / "results.json").read_text())
    except Exception:  # noqa: BLE001 - absent or damaged: it says nothing
        return None
    return next(iter(reports)) if isinstance(reports, dict) and len(reports) == 1 else None


def check_base_folder(folder: Path) -> None:
    """Refuse as `base_checkpoint` anything but a base (what stages 1–2 write: the probe/ folder), naming what it
    is and the folder to give: a run's or a comparison's folder, a stage-1 base/ (its C was never trained), or a
    fine-tuned row (stage 3: it would be fine-tuned again and reported as an ordinary row)."""
    given = f"base_checkpoint {str(folder)!r}"
    if not (folder / WEIGHTS).is_file():
        if (folder / "probe" / WEIGHTS).is_file():
            raise UserError(f"{given} is a run folder, not a checkpoint; point base_checkpoint at {folder / 'probe'}, "
                            "its base (written by stages 1–2)")
        seeds = sorted(folder.glob(f"seed_*/probe/{WEIGHTS}"))
        if seeds:
            raise UserError(f"{given} is a comparison's folder (a run per seed), not a checkpoint; point "
                            f"base_checkpoint at one seed's base, e.g. {seeds[0].parent}")
        return  # not a checkpoint at all: load_checkpoint says what is missing
    name = origin(folder)
    if name is None or stage_of(name) == 2:
        return
    probe = folder.parent / "probe"
    right = (f"{probe}, the probe/ folder of the same run" if (probe / WEIGHTS).is_file()
             else "the probe/ folder of a run (written by stages 1–2)")
    if stage_of(name) == 1:
        raise UserError(f"{given} is a stage-1 (base) folder: its protected classifier C was never trained (stage 2 "
                        f"trains it); point base_checkpoint at {right}")
    raise UserError(f"{given} holds the fine-tuned row {name!r} (stage 3), not a base: it would be fine-tuned again "
                    f"and reported as an ordinary row; point base_checkpoint at {right}")


def load_checkpoint(folder: str | Path, key: str = "base_checkpoint") -> tuple[TwoHeadModel, Config]:
    """Rebuild the model a checkpoint folder describes and load its weights (strictly); `key`, the config key that
    gave the folder, is what the error lines name."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        raise UserError(
            f"{key} {str(folder)!r} is not a checkpoint folder (it needs {WEIGHTS} and {CONFIG}, "
            "e.g. runs/<experiment>/<run>/probe, written by stages 1–2)"
        )
    fix = f"point {key} at an intact checkpoint folder or train a new base (leave {key} unset)"
    try:
        cfg = read_saved_config(folder / CONFIG)
    except UserError as err:
        raise UserError(f"checkpoint config {str(folder / CONFIG)!r} is invalid ({one_line(err)}); {fix}") from None
    model = create_model(cfg.model.backbone, protected_classifier=cfg.model.protected_classifier)
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as err:  # noqa: BLE001 - any failure of the parse is a damaged file, not our bug
        raise UserError(f"checkpoint weights {str(folder / WEIGHTS)!r} cannot be read ({err}): truncated or not a "
                        f"safetensors file; {fix}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise UserError(f"checkpoint weights {str(folder / WEIGHTS)!r} do not fit a {cfg.model.backbone}, the "
                        f"backbone its {CONFIG} names (other parameter names or shapes); {fix}") from None
    return model, cfg


def is_zero3(model: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 converted `model`'s parameters: `prepare` partitions them in place, so each
    rank holds a shard and the module's own tensors are empty placeholders outside a forward."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def whole_state_dict(model: nn.Module) -> dict:
    """A detached CPU copy of the whole weights, on every rank. A ZeRO-3 model's parameters are gathered
    first (DeepSpeed's GatheredParameters, an all-gather: every rank must call this, the same times)."""
    gathered = contextlib.nullcontext()
    if is_zero3(model):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    with gathered:
        return {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}


def whole_model(model: TwoHeadModel, backbone: str, state: Optional[dict] = None) -> TwoHeadModel:
    """`model` as a plain whole module holding `state` (default: its own weights), after its training.

    Any other model is loaded in place. A ZeRO-3 model stays partitioned when its engine is destroyed (and
    keeps some of DeepSpeed's hooks and module attributes, which a later `prepare` would trip over), so it
    is rebuilt: a fresh `backbone` model on the same device with the gathered weights, the same trainable
    flags and mode. Collective for a ZeRO-3 model: every rank must call it.
    """
    if not is_zero3(model):
        if state is not None:
            model.load_state_dict(state)
        return model
    state = whole_state_dict(model) if state is None else state
    with torch.random.fork_rng(devices=[]):  # the throwaway initialisation must not move the seeded stream
        fresh = create_model(backbone, protected_classifier=protected_classifier(model))
    fresh.load_state_dict(state)
    for new, old in zip(fresh.parameters(), model.parameters()):
        new.requires_grad_(old.requires_grad)
    return fresh.to(model.mean.device).train(model.training)


# ---- checkpoints given to a run: checked against its config ----

BASE_KEYS = ("model.backbone", "model.protected_classifier", "data.target", "data.protected",
             "data.image_size")  # what a base fixes
# What a stage-1 M fixes for the stage 2 trained on it: C's own backbone (independent) starts from model.weights.
STAGE_ONE_KEYS = (*(key for key in BASE_KEYS if key != "model.protected_classifier"), "model.weights")


def _check_fixed(cfg: Config, saved: Config, keys: tuple[str, ...], given: str) -> None:
    """Refuse a checkpoint (config key `given`) whose config differs from this run's on `keys`."""
    ours, theirs = cfg.flat(), saved.flat()
    for key in keys:
        if ours[key] != theirs[key]:
            raise UserError(
                f"{given} {get_key(cfg, given)!r} was trained with {key}={theirs[key]} but this run has "
                f"{key}={ours[key]}; set {key}={theirs[key]} or train a new base (leave {given} unset)"
            )


def load_base(cfg: Config) -> TwoHeadModel:
    """The model of `cfg.base_checkpoint`, checked to match the config on every key that a base fixes."""
    check_base_folder(Path(cfg.base_checkpoint))
    model, saved = load_checkpoint(cfg.base_checkpoint)
    _check_fixed(cfg, saved, BASE_KEYS, "base_checkpoint")
    return model


def load_stage_one(cfg: Config, model: Optional[TwoHeadModel] = None) -> dict:
    """Check `cfg.stage1_checkpoint` (a base/ folder stage 1 wrote, of a matching config) and load its M (θ, ρ and the
    still untrained φ) into `model`; C's own backbone (independent) stays as `initial_model` drew it, as stage 1
    would have left it. Returns the base's report (its results.json). With no `model`, only checks."""
    folder = Path(cfg.stage1_checkpoint)
    given = f"stage1_checkpoint {str(folder)!r}"
    written = origin(folder) if (folder / WEIGHTS).is_file() else None
    if written != "base":
        what = f"holds the model {written!r}" if written else f"holds no {WEIGHTS} written by this project"
        raise UserError(f"{given} {what}, not stage 1's M; point stage1_checkpoint at the base/ folder of a run")
    _, saved = load_checkpoint(folder, "stage1_checkpoint")  # a damaged file or config is one line naming it
    _check_fixed(cfg, saved, STAGE_ONE_KEYS, "stage1_checkpoint")
    state = {key: t for key, t in load_file(str(folder / WEIGHTS)).items()
             if not key.startswith("protected_backbone.")}  # an independent run's stage 1 left C's own untouched
    if model is not None:
        missing = [key for key in model.state_dict() if not key.startswith("protected_backbone.") and key not in state]
        if missing:
            raise UserError(f"{given} lacks {missing[0]} ({len(missing)} tensors of M); point it at an intact base/ "
                            "folder")
        model.load_state_dict(state, strict=False)
    return json.loads((folder / "results.json").read_text())["base"]


def stage_one_start(cfg: Config, run_dir: Path) -> Config:
    """`cfg` with `model.weights` set to what stage 1 of this run's base started from, which a row that trains a model
    anew (JTT's identification and final models) starts from too: the weights the config of the base checkpoint (or
    of the stage-1 checkpoint) names, else this run's stage-0 θ (its stage 1 read it); else `cfg` as it is."""
    checkpoint = cfg.base_checkpoint or cfg.stage1_checkpoint
    if checkpoint:
        weights = read_saved_config(Path(checkpoint) / CONFIG).model.weights
    elif cfg.pretrain.epochs > 0:
        weights = str(run_dir / "pretrain" / PRETRAINED)
    else:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=weights))
