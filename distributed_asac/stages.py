"""Stage 1 (base: train θ and ρ on the target label) and stage 2 (probe: freeze θ, train φ on the
protected label), with model selection on the valid split (docs/method.md, Three stages)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import whole_model, whole_state_dict
from .config import Config
from .data.batches import to_pixels, uint8_images
from .data.build import Splits
from .evaluate import evaluate
from .failpoints import failpoint
from .models import TwoHeadModel, set_trainable
from .resume import load_training_state, save_training_state
from .runtime import adam, check_finite
from .tracking import Tracker

# stage → (output of TwoHeadModel.forward it trains, the valid metric that selects the best epoch)
STAGES = {"base": (0, "ACC"), "probe": (1, "protected_ACC")}


def train_stage(
    stage: str, model: TwoHeadModel, splits: Splits, cfg: Config, accelerator: Accelerator, tracker: Tracker,
    state_dir: Optional[Path] = None,
) -> TwoHeadModel:
    """Train `model` for stage `base` or `probe` and return it holding the best epoch's weights (by the
    stage's valid metric). The probe runs the backbone in eval mode: a frozen θ keeps its batch-norm
    statistics too, so C is a linear probe on M's features. With `state_dir`, the full training state is
    saved there at every epoch end, and a state found there is resumed (resume.py)."""
    head, select_on = STAGES[stage]
    stage_cfg = cfg.base if stage == "base" else cfg.probe
    set_trainable(model, stage)
    optimizer = adam(model.parameters(), stage_cfg.lr, cfg)
    loader = DataLoader(uint8_images(splits.train), batch_size=stage_cfg.batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.data.num_workers)
    wrapped, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    best_score, best_state = -1.0, whole_state_dict(model)
    first_epoch = 0
    resumed = load_training_state(accelerator, state_dir, loader)
    if resumed is not None:
        (meta, best_state), first_epoch = resumed, resumed[0]["epoch"]
        best_score = meta["best_score"]
    for epoch in range(first_epoch, stage_cfg.epochs):
        wrapped.train(stage == "base")
        loss_sum = torch.zeros((), device=accelerator.device)
        seen = torch.zeros((), device=accelerator.device)
        bar = tqdm(loader, desc=f"{stage} epoch {epoch + 1}/{stage_cfg.epochs}", leave=False,
                   disable=True if not accelerator.is_main_process else None)  # None: off when not a terminal
        for x, y, a, _ in bar:
            labels = y if stage == "base" else a
            loss = F.cross_entropy(wrapped(to_pixels(x))[head], labels)  # logits [b, 2]
            optimizer.zero_grad()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip)
            optimizer.step()
            loss_sum += loss.detach() * len(labels)
            seen += len(labels)
        train_loss = accelerator.reduce(loss_sum, "sum") / accelerator.reduce(seen, "sum").clamp(min=1)
        check_finite(f"{stage} epoch {epoch + 1}", float(train_loss), model, f"{stage}.lr", stage_cfg.lr)
        valid = evaluate(accelerator, model, splits.valid, stage_cfg.batch_size, num_workers=cfg.data.num_workers)
        report = valid.report()
        tracker.log_metrics({f"{stage}/train_loss": float(train_loss),
                             **{f"{stage}/valid_{k}": v for k, v in report.items()}}, step=epoch)
        if accelerator.is_main_process:
            tqdm.write(f"{stage} epoch {epoch + 1}: train loss {float(train_loss):.4f}, "
                       f"valid {select_on} {report[select_on]:.2f}")
        if report[select_on] > best_score:
            best_score, best_state = report[select_on], whole_state_dict(model)  # the same on every rank
        save_training_state(accelerator, state_dir, epoch + 1, {"best_score": best_score}, best_state, loader)
        failpoint("stage.epoch_end", stage=stage, epoch=epoch + 1)
    accelerator.free_memory()  # drop the accelerator's references so the next stage prepares afresh
    return whole_model(model, cfg.model.backbone, best_state)  # a fresh plain module after ZeRO-3
