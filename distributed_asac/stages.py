"""Stage 1 (base: train θ and ρ on the target label) and stage 2 (probe: freeze θ, train φ on the
protected label), with model selection on the valid split (docs/method.md, Three stages)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import whole_model, whole_state_dict
from .config import Config
from .data.batches import to_pixels, uint8_images
from .data.datasets import Splits
from .evaluate import evaluate
from .loop import Progress, run_epochs
from .models import TwoHeadModel, create_model, set_trainable
from .rows import STAGE_ONE
from .runtime import adam, check_finite, global_batchnorm, random_state_kept, seed_everything, train_loader
from .tracking import Tracker

# stage → (output of TwoHeadModel.forward it trains, the valid metric that selects the best epoch)
STAGES = {"base": (0, "ACC"), "probe": (1, "protected_ACC")}


def initial_model(cfg: Config, accelerator: Accelerator) -> TwoHeadModel:
    """The model stage 1 starts from: `model.backbone` with `model.weights` (and C's own backbone with
    `model.protected_classifier: independent`), drawn from the random state `cfg.seed` (rank r: seed + r; a
    launch's ranks start from rank 0's copy, which Accelerate's `prepare` broadcasts). It leaves the random state
    where stage 1's first draw, its data order, expects it."""
    seed_everything(cfg.seed, accelerator)
    return create_model(cfg.model.backbone, cfg.model.weights, cfg.model.protected_classifier).to(accelerator.device)


@dataclass
class _Training:
    """One stage's training of `model`: its trainable parameters, Adam and shuffled train loader, prepared."""

    stage: str  # base or probe (STAGES)
    model: TwoHeadModel  # unwrapped
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    cfg: Config
    accelerator: Accelerator
    frozen: Optional[nn.Module]  # the stage's backbone when backbone_lr_scale is 0, else None

    @classmethod
    def prepare(cls, stage: str, model: TwoHeadModel, train_set, cfg: Config, accelerator: Accelerator) -> _Training:
        stage_cfg = getattr(cfg, stage)
        set_trainable(model, stage)
        # The backbone the stage trains, θ in stage 1 and C's own in stage 2 (a probe has none), at the lower rate
        # users give pretrained backbones: the whole backbone against the heads, for every backbone of the registry
        # alike (the names of early layers differ by architecture). 0 freezes it.
        own = model.backbone if stage == "base" else model.protected_backbone
        frozen = own if own is not None and stage_cfg.backbone_lr_scale == 0 else None
        if frozen is not None:
            frozen.requires_grad_(False)  # DDP and DeepSpeed skip frozen parameters
        optimizer = adam(model.parameters(), stage_cfg.lr, cfg, slower=own.parameters() if own is not None else (),
                         scale=stage_cfg.backbone_lr_scale)
        loader = train_loader(uint8_images(train_set), stage_cfg.batch_size, f"{stage}.batch_size", accelerator,
                              cfg.data.num_workers)
        wrapped, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        return cls(stage, model, wrapped, optimizer, loader, cfg, accelerator, frozen)

    def epoch(self, epoch: int, batches) -> float:
        """One pass over `batches` (the loader, maybe behind a progress bar), one step per minibatch; returns the
        epoch's train loss (a mean over every image of every rank), checked finite."""
        stage, model, accelerator = self.stage, self.model, self.accelerator
        self.wrapped.train(stage == "base")
        if stage == "probe" and model.protected_backbone is not None:  # an independent C trains its own backbone
            model.protected_backbone.train()
        if self.frozen is not None:  # a frozen backbone keeps its batch-norm statistics too, as the probe's θ does
            self.frozen.eval()
        loss_sum = torch.zeros((), device=accelerator.device)
        seen = torch.zeros((), device=accelerator.device)
        for x, y, a, _ in batches:
            labels = y if stage == "base" else a
            logits = self.wrapped(to_pixels(x), protected=stage == "probe")[STAGES[stage][0]]  # [b, 2]
            loss = F.cross_entropy(logits, labels)
            self.optimizer.zero_grad()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(self.wrapped.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            loss_sum += loss.detach() * len(labels)
            seen += len(labels)
        train_loss = float(accelerator.reduce(loss_sum, "sum") / accelerator.reduce(seen, "sum").clamp(min=1))
        lr = getattr(self.cfg, stage).lr
        check_finite(f"{stage} epoch {epoch + 1}", train_loss, model, f"{stage}.lr", lr)
        return train_loss


def train_stage(
    stage: str, model: TwoHeadModel, splits: Splits, cfg: Config, accelerator: Accelerator, tracker: Tracker,
    state_dir: Optional[Path] = None,
) -> TwoHeadModel:
    """Train `model` for stage `base` or `probe` and return it holding the best epoch's weights (by the
    stage's valid metric). The probe runs the backbone in eval mode: a frozen θ keeps its batch-norm
    statistics too, so C is a linear probe on M's features (an independent C trains its own backbone instead). With `state_dir`, the full training state is
    saved there at every epoch end, and a state found there is resumed (resume.py)."""
    select_on = STAGES[stage][1]
    stage_cfg = cfg.base if stage == "base" else cfg.probe
    training = _Training.prepare(stage, model, splits.train, cfg, accelerator)

    def epoch_work(epoch: int, batches: tqdm, progress: Progress) -> None:
        train_loss = training.epoch(epoch, batches)
        valid = evaluate(accelerator, model, splits.valid, stage_cfg.batch_size, num_workers=cfg.data.num_workers)
        report = valid.report()
        tracker.log_metrics({f"{stage}/train_loss": train_loss,
                             **{f"{stage}/valid_{k}": v for k, v in report.items()}}, step=epoch)
        if accelerator.is_main_process:
            tqdm.write(f"{stage} epoch {epoch + 1}: train loss {train_loss:.4f}, "
                       f"valid {select_on} {report[select_on]:.2f}")
        if report[select_on] > progress.meta["best_score"]:
            progress.meta["best_score"], progress.best = report[select_on], whole_state_dict(model)  # on every rank

    with global_batchnorm(model, cfg.sync_batchnorm):
        progress = run_epochs(stage, stage_cfg.epochs, training.loader, accelerator, state_dir,
                              lambda: Progress({"best_score": -1.0}, whole_state_dict(model)), epoch_work)
    return whole_model(model, cfg.model.backbone, progress.best)  # a fresh plain module after ZeRO-3


def train_erm(model: TwoHeadModel, train_set, cfg: Config, accelerator: Accelerator, epochs: int) -> TwoHeadModel:
    """`model` (M: θ and ρ) trained as stage 1 trains it (cross-entropy on the target, `base.lr`, `base.batch_size`,
    the shuffle drawn from the global random state) for `epochs` epochs, and the last epoch kept: no valid split is
    read, nothing selected, logged or saved. JTT's identification model (mitigations/jtt.py); from `initial_model`
    it is stage 1's model after epoch `epochs`. Returns a plain whole module (a fresh one after ZeRO-3)."""
    training = _Training.prepare("base", model, train_set, cfg, accelerator)
    with global_batchnorm(model, cfg.sync_batchnorm):
        run_epochs("ERM", epochs, training.loader, accelerator, None, lambda: Progress({}, {}),
                   lambda epoch, batches, progress: training.epoch(epoch, batches))
    return whole_model(model, cfg.model.backbone)


STAGE_ONE.update(initial_model=initial_model, train_erm=train_erm, random_state_kept=random_state_kept)
