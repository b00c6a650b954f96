"""The `jtt` row: Just Train Twice (Liu et al. 2021), fine-tuned from the base.

The error set is the train images that the base's M gets wrong (argmax of its target logits, in eval mode,
before any step of stage 3). Stage 3 then trains plain cross-entropy on minibatches drawn with replacement,
an error-set image λ (`jtt.upweight`) times as likely as any other: in expectation the paper's upsampled set
D_up, the error set repeated λ times. Two departures from the paper, both said in docs/mitigations.md: the
identification model is the base itself (the paper trains an ERM model for T epochs, early-stopped, for it),
and the final model is fine-tuned from the base (the issue's design) rather than trained from scratch. Cost
equals plain fine-tuning's: len(train) // k minibatches per epoch (one epoch draws len(train) images, not
|D_up|), |E| optimizer steps on each. Needs no protected label.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

from ..rows import mode, plain
from .groups import forward_pass


def error_set(model, dataset, batch_size: int, device: torch.device) -> torch.Tensor:
    """bool [n]: the base's M predicts item i of `dataset` wrongly."""
    _, logits = forward_pass(model, dataset, batch_size, device)
    return logits.argmax(1) != dataset.targets.long()


def find_errors(cfg, model, train_set, accelerator, tracker) -> tuple[torch.Tensor, dict[str, float]]:
    """The `prepare` hook: the error set of the base on train, and its size for the fine-tune's summary."""
    errors = error_set(model, train_set, cfg.finetune.batch_size, accelerator.device)
    return errors, {"jtt_error_set_size": float(errors.sum()), "jtt_error_share": float(errors.float().mean())}


class UpweightedDraws(Sampler[int]):
    """len(weights) indices drawn with replacement in proportion to `weights`, from (seed, epoch) alone (the same
    on every rank; Accelerate sets the epoch, which a resumed run restores)."""

    def __init__(self, weights: torch.Tensor, seed: int):
        self.weights, self.seed, self.epoch = weights, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        yield from torch.multinomial(self.weights, len(self.weights), replacement=True, generator=generator).tolist()


def upweighted(cfg, dataset, errors: torch.Tensor) -> UpweightedDraws:
    """The `sampler` hook: weight λ for the error set, 1 for the rest."""
    return UpweightedDraws(1.0 + (cfg.jtt.upweight - 1.0) * errors.double(), cfg.seed)


mode("jtt", prepare=find_errors, sampler=upweighted)(plain)
