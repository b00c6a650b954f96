"""The `resample` row: plain fine-tuning on group-balanced minibatches.

Each minibatch of k images holds k/4 of every (target, protected) group (`groups.GroupBalancedBatches`): the
minority groups are oversampled and the majority ones subsampled, as in the group-balanced subsampling and
reweighting baselines of SubpopBench (Yang et al. 2023) and Idrissi et al. (2022), here exact in every minibatch
rather than in expectation. Cost equals plain fine-tuning's: the same base, len(train) // k minibatches per epoch
and |E| optimizer steps of cross-entropy on each.
"""

from __future__ import annotations

from ..rows import mode, plain
from .groups import balanced_batches, check_train_balanceable

mode("resample", sampler=balanced_batches, check_splits=check_train_balanceable("resample"))(plain)
