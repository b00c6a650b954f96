"""The `jtt` row: Just Train Twice (Liu et al. 2021).

First, the identification model: an ERM model stopped after T epochs (`jtt.identification_epochs`; the paper's
CelebA T = 1), trained as stage 1 trains the base (`stages.train_erm`: cross-entropy on train, stage 1's optimiser
settings and data order) from the model stage 1 starts from (`stages.initial_model`: the config's seed, backbone
and weights, which stage 3 sets to those the base's stage 1 started from, stage 0's θ included:
`checkpoint.stage_one_start`), so it is stage 1's model after epoch T. The error set is the train images it gets
wrong (argmax of its target logits, in eval mode). Then the final model trains plain cross-entropy on minibatches drawn with
replacement, an error-set image λ (`jtt.upweight`) times as likely as any other: in expectation the paper's
upsampled set D_up, the error set repeated λ times. One epoch draws len(train) images (not |D_up|): len(train) // k
minibatches, |E| optimizer steps on each, plain fine-tuning's cost, plus T epochs of stage 1 for the identification.

`jtt.final` says where the final model M starts. `retrain` (the paper's): M is trained anew, θ and ρ from that same
initialisation, for finetune.epochs epochs with stage 3's settings (C's head φ stays the base's, frozen, as in
every row). `finetune`: M is fine-tuned from the base (the design before issue 29, kept as a named variant). Needs
no protected label.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

import torch
from torch.utils.data import Sampler

from ..models import TwoHeadModel
from ..rows import STAGE_ONE, mode, plain
from .groups import forward_pass


def error_set(model, dataset, batch_size: int, device: torch.device) -> torch.Tensor:
    """bool [n]: `model`'s M predicts item i of `dataset` wrongly."""
    _, logits = forward_pass(model, dataset, batch_size, device)
    return logits.argmax(1) != dataset.targets.long()


# Above this share of error-set draws M collapsed to one class in every run of the bound and claims studies
# (docs/mitigations.md: 6 runs at 88-95%); at 74-83%, 2 of 9 runs did.
COLLAPSE_DRAW_SHARE = 0.85


def error_draw_share(error_share: float, upweight: float) -> float:
    """The expected share of draws that are error-set images, λe / (λe + 1 − e), e the error set's share of train."""
    return upweight * error_share / (upweight * error_share + 1.0 - error_share)


def collapse_warning(error_share: float, upweight: float) -> Optional[str]:
    """A warning when so many draws are the identification model's mistakes that M is likely to collapse to one
    class, with the λ that brings them down to 2/3 (λ = 2(1 − e)/e, below every share a collapse was seen at); None
    otherwise."""
    share = error_draw_share(error_share, upweight)
    if share <= COLLAPSE_DRAW_SHARE:
        return None
    suggested = max(1, round(2.0 * (1.0 - error_share) / error_share))
    return (f"jtt: the identification model gets {error_share:.1%} of train wrong, so {share:.0%} of the draws at "
            f"jtt.upweight={upweight:g} are its mistakes; above {COLLAPSE_DRAW_SHARE:.0%} M collapsed to one class in "
            f"every run of the bound and claims studies (docs/mitigations.md): jtt.upweight={suggested} brings them "
            "to 2/3")


def start_anew(model: TwoHeadModel, start: TwoHeadModel) -> None:
    """M of `model` (θ and ρ, with θ's batch-norm statistics) set to `start`'s; C's head φ (and C's own backbone, if
    it has one) kept."""
    model.backbone.load_state_dict(start.backbone.state_dict())
    model.target_head.load_state_dict(start.target_head.state_dict())


def find_errors(cfg, model, train_set, accelerator, tracker) -> tuple[torch.Tensor, dict[str, float]]:
    """The `prepare` hook: the identification model's error set on train, its size and its share of the draws for
    the fine-tune's summary (a warning when that share is one M collapsed at); with `jtt.final: retrain`, M of
    `model` (the base's copy that stage 3 trains) back at stage 1's initialisation. The random state is left as it
    was, so that stage 3 draws what every row of the seed draws."""
    initial_model, train_erm, random_state_kept = (STAGE_ONE[k] for k in ("initial_model", "train_erm",
                                                                          "random_state_kept"))
    with random_state_kept(accelerator):
        start = initial_model(cfg, accelerator)
        identification = train_erm(copy.deepcopy(start), train_set, cfg, accelerator, cfg.jtt.identification_epochs)
        errors = error_set(identification, train_set, cfg.finetune.batch_size, accelerator.device)
    if cfg.jtt.final == "retrain":
        start_anew(model, start)
    share = float(errors.float().mean())
    warning = collapse_warning(share, cfg.jtt.upweight)
    if warning and accelerator.is_main_process:
        logging.getLogger(__name__).warning(warning)
    return errors, {"jtt_error_set_size": float(errors.sum()), "jtt_error_share": share,
                    "jtt_error_draw_share": error_draw_share(share, cfg.jtt.upweight)}


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
