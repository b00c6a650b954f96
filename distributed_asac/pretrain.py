"""Stage 0 (optional, `pretrain.epochs > 0`): the backbone θ trained on several attributes of a generated face set of
its own, drawn balanced, so that stage 1 starts from generic face features, as a CelebA user's ImageNet-pretrained
backbone does (docs/method.md, A backbone that keeps the protected attribute).

Its set is the generator's (data/synthetic.py) at the run's image size and cue strengths, with every attribute a fair
coin independent of the others: P(Smiling == Male) = 0.5 in every split, so θ learns the protected cue apart from the
target's. θ learns one logistic output per attribute of `pretrain.attributes` (the mean binary cross-entropy) through
Accelerate as stages 1–3 train: the batch is global, batch norm normalises over it, the shuffle is the same at any
world size. The last epoch is kept: nothing is selected on the run's own data. The stage's seed is `pretrain.seed`,
not `seed`, so every seed of a study starts from one pretrained θ.

Its output, `<run>/pretrain/backbone.safetensors` (checkpoint.save_pretrained), holds θ alone with the backbone's name
in its metadata: a run of that backbone starts from it with `model.weights=<it>` (stage 1 of the same run does so),
a run of another backbone refuses it. Its report: the accuracy on each attribute of its own test split.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .checkpoint import whole_state_dict
from .config import Config, check_batch_sizes
from .data.batches import to_pixels, uint8_images
from .data.celeba import CelebA
from .data.datasets import generate_synthetic
from .loop import Progress, run_epochs
from .models import TwoHeadModel, create_model
from .runtime import adam, check_finite, global_batchnorm, seed_everything, train_loader
from .tracking import Tracker


class Attributes(Dataset):
    """A split of the generated set as stage 0 reads it: (uint8 image [3, S, S], labels float32 [K], index)."""

    def __init__(self, faces: CelebA, names: list[str]):
        self.images = uint8_images(faces)
        self.labels = faces.attribute_labels(names)  # [N, K]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.images[i][0], self.labels[i], i


def pretraining_splits(cfg: Config, accelerator: Accelerator) -> dict[str, Attributes]:
    """The train, valid and test splits of stage 0's generated set (made at `pretrain.root` on first use, by the main
    process first): the run's image size and cue strengths, every attribute drawn balanced, no twins."""
    data = dataclasses.replace(cfg.data, name="synthetic", root=cfg.pretrain.root, cache_dir=None,
                               synthetic_num_images=cfg.pretrain.num_images, synthetic_bias=0.5,
                               synthetic_seed=cfg.pretrain.seed, synthetic_train_twins=False)
    names = cfg.pretrain.attributes
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            generate_synthetic(data)
        # CelebA's loader needs a target and a protected attribute; stage 0 reads every label through `Attributes`
        return {split: Attributes(CelebA(data.root, split, names[0], names[-1], data.image_size,
                                         on_bad_image=data.on_bad_image), names)
                for split in ("train", "valid", "test")}


def check_pretraining(cfg: Config, accelerator: Accelerator) -> None:
    """Refuse, before a run folder exists, what stage 0 cannot run on: its set (generated now, or refused where
    `pretrain.root` holds another) and a batch its train split cannot fill."""
    splits = pretraining_splits(cfg, accelerator)
    check_batch_sizes(cfg, len(splits["train"]), accelerator.num_processes, ("pretrain",))


def attribute_model(cfg: Config) -> TwoHeadModel:
    """θ of `model.backbone` (from `model.weights`) under a multi-label head: the target head widened to one logit
    per attribute, x [B, 3, H, W] → target logits [B, K]. The protected head is frozen and unused."""
    model = create_model(cfg.model.backbone, cfg.model.weights)
    model.target_head = nn.Linear(model.target_head.in_features, len(cfg.pretrain.attributes))
    model.protected_head.requires_grad_(False)  # DDP waits for no gradient of it
    return model


@torch.no_grad()
def attribute_accuracy(accelerator: Accelerator, model: TwoHeadModel, dataset: Attributes, batch_size: int,
                       names: list[str]) -> dict[str, float]:
    """Percent right per attribute (`ACC_<name>`) and their mean (`ACC`) on `dataset`, each image counted once over
    the ranks (rank r takes images r, r + W, ...). Every rank runs the same number of forwards (ZeRO-3 gathers
    parameters in each), the last ones on a repeated batch that counts nothing."""
    model.eval()
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    shard = DataLoader(Subset(dataset, range(rank, len(dataset), world)), batch_size=batch_size)
    correct = torch.zeros(len(names), dtype=torch.long, device=device)  # [K]
    seen = torch.zeros((), dtype=torch.long, device=device)
    batches = 0
    for x, labels, _ in shard:
        logits = model.target_logits(to_pixels(x.to(device)))  # [b, K]
        correct += ((logits > 0).float() == labels.to(device)).sum(0)
        seen += len(labels)
        batches += 1
    for _ in range(batches, math.ceil(math.ceil(len(dataset) / world) / batch_size)):
        model.target_logits(to_pixels(dataset[0][0][None].to(device)))
    correct, seen = accelerator.reduce(correct, "sum"), accelerator.reduce(seen, "sum")
    accuracy = {f"ACC_{name}": 100.0 * float(c) / max(int(seen), 1) for name, c in zip(names, correct)}
    return {**accuracy, "ACC": sum(accuracy.values()) / len(accuracy)}


def pretrain(cfg: Config, accelerator: Accelerator, tracker: Tracker,
             state_dir: Optional[Path] = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Stage 0: returns θ's whole state dict after the last epoch (keys of the backbone alone) and its report (the
    accuracy per attribute on its set's test split). With `state_dir`, the training state is saved there at every
    epoch end, and a state found there is resumed (resume.py)."""
    seed_everything(cfg.pretrain.seed, accelerator)
    splits = pretraining_splits(cfg, accelerator)
    names, stage = cfg.pretrain.attributes, cfg.pretrain
    model = attribute_model(cfg).to(accelerator.device)
    optimizer = adam(model.parameters(), stage.lr, cfg)
    loader = train_loader(splits["train"], stage.batch_size, "pretrain.batch_size", accelerator, cfg.data.num_workers)
    wrapped, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    def epoch_work(epoch: int, batches: tqdm, progress: Progress) -> None:
        wrapped.train()
        loss_sum = torch.zeros((), device=accelerator.device)
        seen = torch.zeros((), device=accelerator.device)
        for x, labels, _ in batches:
            logits = wrapped(to_pixels(x))[0]  # [b, K]: one logit per attribute
            loss = F.binary_cross_entropy_with_logits(logits, labels)
            optimizer.zero_grad()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip)
            optimizer.step()
            loss_sum += loss.detach() * len(labels)
            seen += len(labels)
        train_loss = float(accelerator.reduce(loss_sum, "sum") / accelerator.reduce(seen, "sum").clamp(min=1))
        check_finite(f"pretrain epoch {epoch + 1}", train_loss, model, "pretrain.lr", stage.lr)
        valid = attribute_accuracy(accelerator, model, splits["valid"], stage.batch_size, names)
        tracker.log_metrics({"pretrain/train_loss": train_loss,
                             **{f"pretrain/valid_{k}": v for k, v in valid.items()}}, step=epoch)
        if accelerator.is_main_process:
            tqdm.write(f"pretrain epoch {epoch + 1}: train loss {train_loss:.4f}, valid "
                       + ", ".join(f"{name} {valid[f'ACC_{name}']:.1f}" for name in names))

    with global_batchnorm(model, cfg.sync_batchnorm):
        run_epochs("pretrain", stage.epochs, loader, accelerator, state_dir, lambda: Progress({}, {}), epoch_work)
    report = attribute_accuracy(accelerator, model, splits["test"], stage.batch_size, names)
    state = whole_state_dict(model)  # every rank: a ZeRO-3 gather is collective
    backbone = {key.removeprefix("backbone."): t for key, t in state.items() if key.startswith("backbone.")}
    return backbone, report
