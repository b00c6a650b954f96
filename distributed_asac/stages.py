"""Stage 1 (base: train θ and ρ on the target label) and stage 2 (probe: freeze θ, train φ on the
protected label), with model selection on the valid split (docs/method.md, Three stages)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm

from .checkpoint import whole_model, whole_state_dict
from .config import Config
from .data.batches import to_pixels, uint8_images
from .data.datasets import Splits
from .evaluate import evaluate
from .loop import Progress, run_epochs
from .models import TwoHeadModel, set_trainable
from .runtime import adam, check_finite, global_batchnorm, train_loader
from .tracking import Tracker

# stage → (output of TwoHeadModel.forward it trains, the valid metric that selects the best epoch)
STAGES = {"base": (0, "ACC"), "probe": (1, "protected_ACC")}


def train_stage(
    stage: str, model: TwoHeadModel, splits: Splits, cfg: Config, accelerator: Accelerator, tracker: Tracker,
    state_dir: Optional[Path] = None,
) -> TwoHeadModel:
    """Train `model` for stage `base` or `probe` and return it holding the best epoch's weights (by the
    stage's valid metric). The probe runs the backbone in eval mode: a frozen θ keeps its batch-norm
    statistics too, so C is a linear probe on M's features (an independent C trains its own backbone instead). With `state_dir`, the full training state is
    saved there at every epoch end, and a state found there is resumed (resume.py)."""
    head, select_on = STAGES[stage]
    stage_cfg = cfg.base if stage == "base" else cfg.probe
    set_trainable(model, stage)
    optimizer = adam(model.parameters(), stage_cfg.lr, cfg)
    loader = train_loader(uint8_images(splits.train), stage_cfg.batch_size, f"{stage}.batch_size", accelerator,
                          cfg.data.num_workers)
    wrapped, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    def epoch_work(epoch: int, batches: tqdm, progress: Progress) -> None:
        wrapped.train(stage == "base")
        if stage == "probe" and model.protected_backbone is not None:  # an independent C trains its own backbone
            model.protected_backbone.train()
        loss_sum = torch.zeros((), device=accelerator.device)
        seen = torch.zeros((), device=accelerator.device)
        for x, y, a, _ in batches:
            labels = y if stage == "base" else a
            loss = F.cross_entropy(wrapped(to_pixels(x), protected=stage == "probe")[head], labels)  # logits [b, 2]
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
        if report[select_on] > progress.meta["best_score"]:
            progress.meta["best_score"], progress.best = report[select_on], whole_state_dict(model)  # on every rank

    with global_batchnorm(model, cfg.sync_batchnorm):
        progress = run_epochs(stage, stage_cfg.epochs, loader, accelerator, state_dir,
                              lambda: Progress({"best_score": -1.0}, whole_state_dict(model)), epoch_work)
    return whole_model(model, cfg.model.backbone, progress.best)  # a fresh plain module after ZeRO-3
