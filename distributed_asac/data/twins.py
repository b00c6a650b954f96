"""The true counterfactual twins of the train split, for the oracle_counterfactual row (generated dataset only).

The generator writes the twin of every train image on request (`data.synthetic_train_twins`): the same draws,
only the protected attribute flipped. No real dataset has them, so this row bounds what any counterfactual
augmentation (ASAC, the GAN) can reach here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

from ..errors import UserError

if TYPE_CHECKING:  # config imports the row registry, which imports this module
    from ..config import DataConfig

_MODE = "finetune.mode=oracle_counterfactual"


def train_twins(data: DataConfig) -> Dataset:
    """The twins of the train split of `data` (its CelebA-format files read with counterfactual=True), or one
    UserError saying how to get them."""
    if data.name == "lfw":
        raise UserError(f"{_MODE} needs the true twin of every train image, and LFW has none (only the generated "
                        "dataset can render them); use data.name=synthetic with data.synthetic_train_twins=true")
    if data.name == "synthetic" and not data.synthetic_train_twins:
        raise UserError(f"{_MODE} needs the true twin of every train image, which the generated dataset writes only "
                        "with data.synthetic_train_twins=true; set it (with a data.root of its own: a dataset made "
                        "without train twins is not changed in place)")
    from .celeba import CelebA

    try:
        return CelebA(data.root, "train", data.target, data.protected, data.image_size, counterfactual=True,
                      cache_dir=data.cache_dir, on_bad_image=data.on_bad_image)
    except UserError as err:
        raise UserError(f"{_MODE}: {err}") from None


class WithTwins(Dataset):
    """Items ((image, twin), y, (a, twin_a), i): item i of `images` and its twin from `twins` (the same split read
    with counterfactual=True), matched by image id; a twin keeps its image's target label."""

    def __init__(self, images: Dataset, twins: Dataset):
        row_of = {image_id: row for row, image_id in enumerate(twins.image_ids)}
        lacking = [image_id for image_id in images.image_ids if image_id not in row_of]
        if lacking:  # a twin left out by data.on_bad_image=skip whose image was kept
            raise UserError(f"{_MODE}: {len(lacking)} train images have no readable twin (first: {lacking[0]}); "
                            "regenerate the dataset")
        self.images, self.twins = images, twins
        self.rows = [row_of[image_id] for image_id in images.image_ids]  # twin row of each item
        if not torch.equal(twins.targets[self.rows], images.targets):
            raise UserError(f"{_MODE}: the twins' target labels differ from their images'; a twin flips only the "
                            "protected attribute: regenerate the dataset")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image, y, a, index = self.images[i]
        twin, _, twin_a, _ = self.twins[self.rows[i]]
        return (image, twin), y, (a, twin_a), index


def collate_with_twins(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """k items of `WithTwins` → x [2k, 3, H, W] (the k images, then their k twins in the same order), y [2k],
    a [2k] and the dataset indices [2k]: entry j + k is the twin of entry j."""
    images = torch.stack([pair[0] for pair, *_ in batch] + [pair[1] for pair, *_ in batch])
    y = torch.tensor([item[1] for item in batch] * 2)
    a = torch.tensor([item[2][0] for item in batch] + [item[2][1] for item in batch])
    index = torch.tensor([item[3] for item in batch] * 2)
    return images, y, a, index
