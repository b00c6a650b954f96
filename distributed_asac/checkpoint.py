"""Model checkpoints as safetensors with the resolved config beside them (no pickle on load), and the whole
weights of a model whose parameters DeepSpeed ZeRO-3 partitioned across ranks."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import Config, read_saved_config, save_config
from .errors import UserError, one_line
from .files import atomic_path
from .models import TwoHeadModel, create_model, protected_classifier

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"


def save_checkpoint(state_dict: dict, cfg: Config, folder: Path) -> None:
    """Write `folder/model.safetensors` and `folder/config.yaml`, each atomically, so a crash never leaves a
    half-written checkpoint where a good one stood."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in state_dict.items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    with atomic_path(folder / CONFIG) as tmp:
        save_config(cfg, tmp)


def load_checkpoint(folder: str | Path) -> tuple[TwoHeadModel, Config]:
    """Rebuild the model a checkpoint folder describes and load its weights (strictly)."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        raise UserError(
            f"base_checkpoint {str(folder)!r} is not a checkpoint folder (it needs {WEIGHTS} and {CONFIG}, "
            "e.g. runs/<experiment>/<run>/probe, written by stages 1–2)"
        )
    fix = "point base_checkpoint at an intact checkpoint folder or train a new base (leave base_checkpoint unset)"
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
