"""What the rows beside ASAC share: the (target, protected) group of each image, the check that a split can be
balanced, a group-balanced minibatch sampler, and one pass of a model over a split."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.batches import to_pixels, uint8_images
from ..errors import UserError
from ..models import TwoHeadModel, eval_mode

GROUPS = 4  # (y, a) ∈ {0, 1}²: group 2·y + a


def group_ids(y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """y [n], a [n] → the group 2·y + a of each image [n] (0: y=0 a=0, 1: y=0 a=1, 2: y=1 a=0, 3: y=1 a=1)."""
    return 2 * y.long() + a.long()


def dataset_groups(dataset: Dataset) -> torch.Tensor:
    """The group of every item of a face dataset (its `targets` and `protected_labels`), [n]."""
    return group_ids(dataset.targets, dataset.protected_labels)


def group_counts(groups: torch.Tensor) -> tuple[list[int], str]:
    """The images of each group, and the same as text: `(y=0, a=0) 12, (y=0, a=1) 0, ...`."""
    counts = torch.bincount(groups, minlength=GROUPS).tolist()
    return counts, ", ".join(f"(y={g // 2}, a={g % 2}) {n}" for g, n in enumerate(counts))


def check_groups(groups: torch.Tensor, minimum: int, what: str) -> None:
    """One UserError, naming `what` (the row and split), unless every group holds at least `minimum` images."""
    counts, shown = group_counts(groups)
    if min(counts) < minimum:
        raise UserError(f"{what} needs at least {minimum} image(s) in every (target, protected) group to balance, "
                        f"and has {shown}; use a larger or less biased dataset, or another row")


class GroupBalancedBatches(Sampler[int]):
    """`len(groups) // k` minibatches of k indices, each group-balanced: k // 4 images of every (target, protected)
    group (the k mod 4 left over go to distinct groups drawn at random). Within a group images are drawn without
    replacement from a permutation of it, and a used-up group continues with a fresh permutation: small groups
    recur, large ones are subsampled. The order is a function of (seed, epoch) alone, the same on every rank;
    Accelerate sets the epoch (`set_epoch`) from its loader's count, which a resumed run restores."""

    def __init__(self, groups: torch.Tensor, batch_size: int, seed: int):
        self.members = [(groups == g).nonzero().squeeze(1) for g in range(GROUPS)]
        self.batches, self.batch_size, self.seed, self.epoch = len(groups) // batch_size, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches * self.batch_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        queues, used = [m[torch.randperm(len(m), generator=generator)] for m in self.members], [0] * GROUPS
        self.epoch += 1
        for _ in range(self.batches):
            sizes = [self.batch_size // GROUPS] * GROUPS
            for g in torch.randperm(GROUPS, generator=generator)[:self.batch_size % GROUPS].tolist():
                sizes[g] += 1
            batch = []
            for g, size in enumerate(sizes):
                while size > 0:
                    if used[g] == len(queues[g]):
                        queues[g], used[g] = self.members[g][torch.randperm(len(self.members[g]), generator=generator)], 0
                    take = queues[g][used[g]:used[g] + size]
                    batch.append(take)
                    used[g] += len(take)
                    size -= len(take)
            batch = torch.cat(batch)
            yield from batch[torch.randperm(len(batch), generator=generator)].tolist()


def balanced_batches(cfg, dataset: Dataset, prepared=None) -> GroupBalancedBatches:
    """The `sampler` hook of the rows that draw group-balanced minibatches (resample, group_dro)."""
    return GroupBalancedBatches(dataset_groups(dataset), cfg.finetune.batch_size, cfg.seed)


def check_train_balanceable(row: str):
    """A `check_splits` hook: the train split must hold every group (else no minibatch can be balanced)."""

    def check(cfg, splits) -> None:
        check_groups(dataset_groups(splits.train), 1, f"finetune.mode={row} (the train split)")

    return check


@torch.no_grad()
def forward_pass(model: TwoHeadModel, dataset: Dataset, batch_size: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's features [n, d] and M's logits [n, 2] on every image of `dataset`, in its order, with the
    model in eval mode (batch-norm running statistics, none updated); on the host."""
    features, logits = [], []
    with eval_mode(model):
        for x, *_ in DataLoader(uint8_images(dataset), batch_size=batch_size, shuffle=False):
            x = to_pixels(x).to(device)
            f = model.backbone((x - model.mean) / model.std)  # [b, d], as TwoHeadModel.forward computes it
            features.append(f.cpu())
            logits.append(model.target_head(f).cpu())
    return torch.cat(features), torch.cat(logits)
