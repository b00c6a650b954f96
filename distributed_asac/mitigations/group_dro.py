"""The `group_dro` row: GroupDRO's online group weights (Sagawa et al. 2020, Algorithm 1).

The weights q (one per (target, protected) group, uniform at the start of stage 3) are updated once per distinct
minibatch by exponentiated gradient ascent on its group losses, q_g ← q_g · exp(η · L_g), then normalised; each
step descends on Σ_g q_g · L_g. This is `compute_robust_loss` of the authors' code (kohpangwei/group_DRO,
loss.py) without its optional generalization adjustment (its default, 0) and without `--btl`. L_g is the mean
cross-entropy of the minibatch's group-g images (0 for a group that is absent). As the paper's Algorithm 1 draws
the group first and its code samples groups uniformly (`--reweight_groups`), minibatches are group-balanced
(`groups.GroupBalancedBatches`, as the resample row's).

Cost equals plain fine-tuning's: the same base and minibatches per epoch, |E| optimizer steps on each. The paper
takes one step, and one q update, per minibatch; here a minibatch's |E| steps all train on its same images, so only
the first updates q (from the losses of the model as it is then) and the later ones descend with that q: η means
per distinct minibatch what it means in the paper (an update per step would make it |E| times as large).

Across W ranks, q and the robust loss both come from the group sums and counts of the global minibatch, so that W
processes train what one process trains on the same images (the loss is derived in `GroupWeights.step`). q is
saved with every epoch's training state, so that a resumed stage goes on with the q its last finished epoch left.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from accelerate.utils import reduce

from ..rows import Chunk, StepContext, mode
from .groups import GROUPS, balanced_batches, check_train_balanceable, group_ids


@dataclass
class GroupWeights:
    """GroupDRO's q [4] with its step size η, carried across the steps of stage 3 on each of `processes` ranks."""

    eta: float
    q: torch.Tensor  # [4], sums to 1
    processes: int = 1  # W, the ranks that each hold a share of every minibatch
    update_due: bool = True  # the next step is the first on its minibatch: it updates q (`new_minibatch`)

    def new_minibatch(self) -> None:
        """The steps that follow train on a new minibatch: the first of them updates q."""
        self.update_due = True

    def step(self, losses: torch.Tensor, groups: torch.Tensor) -> dict[str, torch.Tensor]:
        """One step's loss terms from this rank's per-image losses [n] of groups [n] (updating q first if the step is
        its minibatch's first): `loss`, what this rank descends on (its mean over ranks is the robust loss
        Σ_g q_g · L_g of the global minibatch), `loss_ce` the plain mean, `loss_worst_group` max_g L_g."""
        # [4] each, this rank's; not torch.bincount, whose output size needs the largest group id on the host (a GPU
        # wait per step)
        sums = torch.zeros(GROUPS, dtype=losses.dtype, device=losses.device).index_add(0, groups, losses)
        counts = torch.zeros(GROUPS, dtype=losses.dtype, device=losses.device).index_add(0, groups, torch.ones_like(losses))
        totals = torch.cat([sums.detach(), counts])  # [8]
        if self.processes > 1:
            totals = reduce(totals, "sum")  # every rank: the global minibatch's group sums S_g and counts N_g
        global_counts = totals[GROUPS:].clamp(min=1)  # [4] N_g (an absent group's S_g is 0: L_g = 0)
        global_loss = totals[:GROUPS] / global_counts  # [4] L_g = S_g / N_g, no gradient
        if self.update_due:
            self.q = self.q * torch.exp(self.eta * global_loss)
            self.q = self.q / self.q.sum()
            self.update_due = False
        # The robust loss of the global minibatch is L = Σ_g q_g · S_g / N_g with S_g = Σ_r s_g(r), s_g(r) [4] this
        # rank's sums (with gradient) and N_g the global counts (constants). DDP (and DeepSpeed) average the W ranks'
        # gradients, (1/W) Σ_r ∇ℓ_r, so the rank loss ℓ_r = W · Σ_g q_g · s_g(r) / N_g gives exactly ∇L =
        # Σ_g q_g · Σ_r ∇s_g(r) / N_g (with one process, ℓ = L). Batch norm over the global batch adds no term:
        # its all-reduce carries each rank's gradient to the others (runtime.GlobalBatchNorm2d).
        loss = self.processes * (self.q * sums / global_counts).sum()
        return {"loss": loss, "loss_ce": losses.mean(), "loss_worst_group": global_loss.max()}

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
    return GroupWeights(cfg.group_dro.eta, q, accelerator.num_processes), {}


@mode("group_dro", prepare=start_weights, sampler=balanced_batches, check_splits=check_train_balanceable("group_dro"))
def group_dro(ctx: StepContext, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> list[Chunk]:
    """|E| steps on the k clean images (as plain fine-tuning), each with GroupDRO's robust loss; the first updates q.
    One chunk repeated, so that `finetune.steps=per_minibatch` makes it one step (stage3.one_step)."""
    ctx.prepared.new_minibatch()
    return [Chunk(x, y, loss=partial(ctx.prepared.loss, groups=group_ids(y, a)))] * len(ctx.magnitudes)
