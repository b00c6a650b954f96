"""The `group_dro` row: GroupDRO's online group weights (Sagawa et al. 2020, Algorithm 1).

The weights q (one per (target, protected) group, uniform at the start of stage 3) are updated at every
optimizer step by exponentiated gradient ascent on the minibatch's group losses, q_g ← q_g · exp(η · L_g),
then normalised; the step then descends on Σ_g q_g · L_g with the updated q. This is `compute_robust_loss` of
the authors' code (kohpangwei/group_DRO, loss.py) without its optional generalization adjustment (its default,
0) and without `--btl`. L_g is the mean cross-entropy of the minibatch's group-g images (0 for a group that is
absent). As the paper's Algorithm 1 draws the group first and its code samples groups uniformly
(`--reweight_groups`), minibatches are group-balanced (`groups.GroupBalancedBatches`, as the resample row's).
Cost equals plain fine-tuning's: the same base and minibatches per epoch, |E| optimizer steps on each, each
step one q update. Across ranks, the q update uses the group losses summed over all ranks, so that every rank
keeps the same q; the descent uses the rank's own minibatch, as DDP does for any loss. q is saved with every
epoch's training state, so that a resumed stage goes on with the q its last finished epoch left.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..rows import Chunk, StepContext, mode
from .groups import GROUPS, balanced_batches, check_train_balanceable, group_ids


@dataclass
class GroupWeights:
    """GroupDRO's q [4] with its step size η, carried across the steps of stage 3."""

    eta: float
    q: torch.Tensor  # [4], sums to 1

    def step(self, losses: torch.Tensor, groups: torch.Tensor) -> dict[str, torch.Tensor]:
        """One step's update of q from per-image losses [n] of groups [n], then the loss terms: `loss` =
        Σ_g q_g · L_g (the robust loss, with the updated q), `loss_ce` the plain mean, `loss_worst_group` max_g L_g."""
        sums = torch.zeros(GROUPS, dtype=losses.dtype, device=losses.device).index_add(0, groups, losses)
        # not torch.bincount, whose output size needs the largest group id on the host (a GPU wait per step)
        counts = torch.zeros(GROUPS, dtype=losses.dtype, device=losses.device).index_add(0, groups, torch.ones_like(losses))
        group_loss = sums / counts.clamp(min=1)  # [4] L_g, with gradient
        totals = torch.cat([sums.detach(), counts])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)  # every rank updates q with the same global group losses
        global_loss = totals[:GROUPS] / totals[GROUPS:].clamp(min=1)
        self.q = self.q * torch.exp(self.eta * global_loss)
        self.q = self.q / self.q.sum()
        return {"loss": (self.q * group_loss).sum(), "loss_ce": losses.mean(), "loss_worst_group": global_loss.max()}

    def carried(self) -> dict[str, torch.Tensor]:
        """What a resumed stage needs of the weights: q as the last finished epoch left it."""
        return {"group_dro.q": self.q.detach().clone()}

    def restore(self, carried: dict[str, torch.Tensor]) -> None:
        self.q = carried["group_dro.q"].to(self.q.device, self.q.dtype)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> dict[str, torch.Tensor]:
        """A chunk's `loss` hook: `step` on the per-image cross-entropy of logits [n, 2] against labels [n]."""
        return self.step(F.cross_entropy(logits, labels, reduction="none"), groups)


def start_weights(cfg, model, train_set, accelerator, tracker) -> tuple[GroupWeights, dict[str, float]]:
    """The `prepare` hook: uniform q and η = group_dro.eta, once as stage 3 starts."""
    q = torch.full((GROUPS,), 1.0 / GROUPS, dtype=torch.float32, device=accelerator.device)
    return GroupWeights(cfg.group_dro.eta, q), {}


@mode("group_dro", prepare=start_weights, sampler=balanced_batches, check_splits=check_train_balanceable("group_dro"))
def group_dro(ctx: StepContext, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> list[Chunk]:
    """|E| steps on the k clean images (as plain fine-tuning), each with GroupDRO's robust loss and q update."""
    return [Chunk(x, y, loss=partial(ctx.prepared.loss, groups=group_ids(y, a)))] * len(ctx.magnitudes)
