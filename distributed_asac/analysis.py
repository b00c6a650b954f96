"""Where M looks and what fools it, before and after fine-tuning (paper §4.2 and supplement B).

- Robustness to ASACs: FGSM images made against the model's own protected head C at growing ε; the curve
  gives M's accuracy on them (should stay flat once M no longer uses the protected cue) and C's accuracy
  (falls: the ASACs still fool C).
- Integrated Gradients (Captum) of M's true-class logit, and the share of |IG| that falls in the mouth box
  from the landmarks: the paper reports attributions moving to the mouth after ASAC fine-tuning.

Both run on the main process over the first images of the test split: they describe a model, they are
not a metric that needs every image.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .attacks import fgsm
from .config import AnalysisConfig


@torch.no_grad()
def _accuracies(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> tuple[int, int]:
    target_logits, protected_logits = model(x)
    return int((target_logits.argmax(1) == y).sum()), int((protected_logits.argmax(1) == a).sum())


def robustness_curve(model: torch.nn.Module, dataset: Dataset, eps_list: list[float], n_images: int,
                     batch_size: int, device: torch.device) -> list[dict[str, float]]:
    """[{eps, target_ACC, protected_ACC}] in percent, for FGSM ASACs against the model's own C."""
    model.eval()
    subset = Subset(dataset, range(min(n_images, len(dataset))))
    correct = torch.zeros(len(eps_list), 2)
    for x, y, a, _ in DataLoader(subset, batch_size=batch_size):
        x, y, a = x.to(device), y.to(device), a.to(device)
        asacs = fgsm(model.protected_logits, x, a, eps_list)  # [|E|, b, 3, H, W]: one gradient for every ε
        for j in range(len(eps_list)):
            correct[j] += torch.tensor(_accuracies(model, asacs[j], y, a), dtype=torch.float)
    n = len(subset)
    return [{"eps": e, "target_ACC": 100 * float(c[0]) / n, "protected_ACC": 100 * float(c[1]) / n}
            for e, c in zip(eps_list, correct)]


def box_share(attributions: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Share of Σ|attribution| inside each box: attributions [B, H, W] ≥ 0, boxes int [B, 4] (x0, y0, x1, y1),
    x1/y1 exclusive → [B] in [0, 1]."""
    height, width = attributions.shape[1:]
    ys = torch.arange(height).view(1, height, 1)
    xs = torch.arange(width).view(1, 1, width)
    x0, y0, x1, y1 = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)  # [B, H, W]
    total = attributions.sum((1, 2)).clamp(min=1e-12)
    return (attributions * inside).sum((1, 2)) / total


def ig_maps(model: torch.nn.Module, dataset: Dataset, indices: list[int], steps: int,
            device: torch.device) -> torch.Tensor:
    """|Integrated Gradients| of M's true-class logit, summed over channels: [n, H, W] for the images
    `indices` of `dataset`, from a black baseline with `steps` Riemann steps (Captum)."""
    from captum.attr import IntegratedGradients

    model.eval()
    items = [dataset[i] for i in indices]
    x = torch.stack([item[0] for item in items]).to(device)
    y = torch.tensor([item[1] for item in items], device=device)
    ig = IntegratedGradients(model.target_logits)
    return ig.attribute(x, baselines=torch.zeros_like(x), target=y, n_steps=steps,
                        internal_batch_size=256).abs().sum(1).cpu()


def ig_mouth_share(model: torch.nn.Module, dataset: Dataset, n_images: int, steps: int,
                   device: torch.device) -> Optional[dict[str, float]]:
    """Mean share of |IG| (summed over channels) in the mouth box, and the share of pixels the box covers
    (what a uniform attribution would get). None when the dataset has no landmarks."""
    if not hasattr(dataset, "mouth_box"):
        return None
    indices = list(range(min(n_images, len(dataset))))
    attributions = ig_maps(model, dataset, indices, steps, device)  # [n, H, W]
    boxes = torch.stack([dataset.mouth_box(i) for i in indices])
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).float() / attributions[0].numel()
    return {"IG_mouth_share": float(box_share(attributions, boxes).mean()), "mouth_area_share": float(area.mean())}


def figure_indices(dataset: Dataset, per_group: int = 2) -> list[int]:
    """The first `per_group` images of each (target, protected) group, groups in the order (y, a) = (0, 0),
    (0, 1), (1, 0), (1, 1): the fixed images of the IG figure, the same for every model of a run."""
    groups = dataset.targets * 2 + dataset.protected_labels  # [n]
    return [i for g in range(4) for i in (groups == g).nonzero().flatten()[:per_group].tolist()]


def analyse(model: torch.nn.Module, test: Dataset, cfg: AnalysisConfig, batch_size: int,
            device: torch.device) -> dict[str, object]:
    """The robustness curve and the IG summary of `model` (either left out when configured off)."""
    was_training = model.training
    out: dict[str, object] = {}
    if cfg.robustness_images > 0 and cfg.robustness_eps:
        eps = sorted({0.0, *cfg.robustness_eps})
        out["robustness"] = robustness_curve(model, test, eps, cfg.robustness_images, batch_size, device)
    if cfg.ig_images > 0:
        share = ig_mouth_share(model, test, cfg.ig_images, cfg.ig_steps, device)
        if share is not None:
            out.update(share)
    model.train(was_training)
    return out
