"""The train / valid / test datasets a config names (and counterfactual twins where they exist)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from accelerate import Accelerator
from torch.utils.data import Dataset

from ..config import DataConfig


@dataclass
class Splits:
    train: Dataset
    valid: Dataset
    test: Dataset
    twins: Optional[Dataset] = None  # test images with only the protected attribute flipped


def build_splits(cfg: DataConfig, accelerator: Accelerator) -> Splits:
    """Load the dataset `cfg.name`; the generated one is written first, by the main process only."""
    from .celeba import CelebA

    if cfg.name == "synthetic":
        from .synthetic import generate

        with accelerator.main_process_first():
            if accelerator.is_main_process:
                generate(
                    Path(cfg.root),
                    num_images=cfg.synthetic_num_images,
                    bias=cfg.synthetic_bias,
                    seed=cfg.synthetic_seed,
                    size=(cfg.image_size, cfg.image_size),
                )
    if cfg.name in ("synthetic", "celeba"):
        splits = Splits(*(CelebA(cfg.root, split, cfg.target, cfg.protected, cfg.image_size)
                          for split in ("train", "valid", "test")))
        if cfg.name == "synthetic":
            splits.twins = CelebA(cfg.root, "test", cfg.target, cfg.protected, cfg.image_size, counterfactual=True)
        return splits
    raise NotImplementedError(f"data.name {cfg.name!r} is not wired yet")
