"""Where M looks and what fools it, before and after fine-tuning (paper §4.2 and supplement B), and why.

- Robustness to ASACs (paper §4.2.1), two curves of FGSM images at growing ε:
  `robustness`: ASACs made against the C that stage 3 attacks (the base's C: the `attacker`), given to this model's
  M (should stay accurate after ASAC fine-tuning where the base's M was not) and to this model's own C (new θ,
  old φ); `robustness_own_C`, labelled apart: ASACs made against this model's own C.
- The mechanism: on the same images, the cosine between ∇ₓ CE(C(x), a) (C: the attacker's) and ∇ₓ CE(M(x), y)
  per image, and the share of ASACs at the training ε that flip M's prediction. Where the two gradients are
  parallel, an ASAC is an adversarial example against M, and ASAC fine-tuning is small-ε adversarial training.
- Integrated Gradients (Captum) of M's true-class logit, and the share of |IG| that falls in the mouth box
  from the landmarks: the paper reports attributions moving to the mouth after ASAC fine-tuning.

All run on the main process over the first images of the test split: they describe a model, they are not a
metric that needs every image.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from .attacks import fgsm
from .config import AnalysisConfig
from .models import TwoHeadModel


def _first_images(dataset: Dataset, n_images: int, batch_size: int) -> DataLoader:
    return DataLoader(Subset(dataset, range(min(n_images, len(dataset)))), batch_size=batch_size)


def robustness_curve(model: TwoHeadModel, attacker: TwoHeadModel, dataset: Dataset, eps_list: list[float],
                     n_images: int, batch_size: int, device: torch.device) -> list[dict[str, float]]:
    """[{eps, target_ACC, protected_ACC[, attacker_protected_ACC]}] in percent on FGSM ASACs made against
    `attacker`'s C: this model's M and C on them, and (when the attacker is another model) the attacker's C."""
    model.eval()
    attacker.eval()
    columns = ["target_ACC", "protected_ACC"] + (["attacker_protected_ACC"] if attacker is not model else [])
    correct = torch.zeros(len(eps_list), len(columns))
    n = 0
    for x, y, a, _ in _first_images(dataset, n_images, batch_size):
        x, y, a = x.to(device), y.to(device), a.to(device)
        asacs = fgsm(attacker.protected_logits, x, a, eps_list)  # [|E|, b, 3, H, W]: one gradient for every ε
        with torch.no_grad():
            for j in range(len(eps_list)):
                target_logits, protected_logits = model(asacs[j])
                hits = [target_logits.argmax(1) == y, protected_logits.argmax(1) == a]
                if attacker is not model:
                    hits.append(attacker.protected_logits(asacs[j]).argmax(1) == a)
                correct[j] += torch.stack(hits).sum(1).float().cpu()
        n += len(x)
    return [{"eps": e, **{name: 100 * float(c) / n for name, c in zip(columns, row)}} for e, row in zip(eps_list, correct)]


def per_image_cosine(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """cos(u_i, v_i) = u_i·v_i / (‖u_i‖ ‖v_i‖) per image of u, v [b, ...], in float64 → [b]; NaN where either is 0.

    In float64 because input gradients of a confident model are tiny (1e-20 and less): in float32 the product of
    the two norms underflows and torch's cosine_similarity returns values far outside [−1, 1]."""
    u, v = u.flatten(1).double(), v.flatten(1).double()
    norms = u.norm(dim=1) * v.norm(dim=1)
    return torch.where(norms > 0, (u * v).sum(1) / norms, torch.full_like(norms, math.nan))


def gradient_alignment(model: TwoHeadModel, attacker: TwoHeadModel, dataset: Dataset, eps: list[float], n_images: int,
                       batch_size: int, device: torch.device) -> dict[str, float]:
    """How close an ASAC is to an adversarial example against M, on the first `n_images` test images:
    cos(∇ₓ CE(C(x), a), ∇ₓ CE(M(x), y)) per image (C: the attacker's, M: this model's), as its mean and quartiles
    (`grad_cosine_mean`, `_q25`, `_median`, `_q75`) and |cos| as its mean and quartiles (`grad_abs_cosine_mean`,
    `_q25`, `_median`, `_q75`), and per ε > 0 of `eps` the share of FGSM ASACs against that C
    whose M prediction differs from M's on the clean image (`asac_flips_M_eps_<ε>`, and their mean
    `asac_flips_M`). Everything in eval mode: per-image gradients do not depend on the batch. An image where
    either gradient is exactly 0 (a loss saturated in float32) has no cosine and is left out of its statistics."""
    model.eval()
    attacker.eval()
    eps = [e for e in eps if e > 0]
    cosines, flips, seen = [], torch.zeros(len(eps)), 0
    for x, y, a, _ in _first_images(dataset, n_images, batch_size):
        x, y, a = x.to(device), y.to(device), a.to(device)
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():  # sums: each image's gradient is its own
            (grad_c,) = torch.autograd.grad(F.cross_entropy(attacker.protected_logits(x), a, reduction="sum"), x)
            (grad_m,) = torch.autograd.grad(F.cross_entropy(model.target_logits(x), y, reduction="sum"), x)
        cosines.append(per_image_cosine(grad_c, grad_m).cpu())  # [b]
        seen += len(x)
        if eps:
            x = x.detach()
            asacs = torch.clamp(x + torch.tensor(eps, device=device).view(-1, 1, 1, 1, 1) * grad_c.sign(), 0.0, 1.0)
            with torch.no_grad():  # asacs [|eps|, b, 3, H, W]: FGSM against C, as fgsm() makes them
                clean = model.target_logits(x).argmax(1)
                flipped = model.target_logits(asacs.flatten(0, 1)).argmax(1).view(len(eps), -1) != clean
            flips += flipped.sum(1).float().cpu()
    cos = torch.cat(cosines)
    cos = cos[~cos.isnan()] if not cos.isnan().all() else cos  # a vanished gradient has no direction: left out
    quartiles = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    # On a balanced test split the sign follows y == a (the two losses pull together where the labels agree and
    # apart where they differ), so the mean can sit near 0 while every |cos| is near 1: report both, and the
    # quartiles of |cos| (its upper quartile bounds the alignment of three images in four, whatever their sign).
    out = {"grad_cosine_mean": float(cos.mean()), "grad_abs_cosine_mean": float(cos.abs().mean())}
    for prefix, values in (("grad_cosine", cos), ("grad_abs_cosine", cos.abs())):
        q25, median, q75 = torch.quantile(values, quartiles).tolist()
        out.update({f"{prefix}_q25": q25, f"{prefix}_median": median, f"{prefix}_q75": q75})
    if eps:
        rates = {f"asac_flips_M_eps_{e:g}": float(f) / seen for e, f in zip(eps, flips)}
        out.update(rates, asac_flips_M=sum(rates.values()) / len(rates))
    return out


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


def analyse(model: TwoHeadModel, attacker: Optional[TwoHeadModel], test: Dataset, cfg: AnalysisConfig,
            train_eps: list[float], batch_size: int, device: torch.device) -> dict[str, object]:
    """The robustness curves, the mechanism numbers (with ASACs at `train_eps`) and the IG summary of `model`
    (each left out when configured off). `attacker`: the model whose C stage 3 attacks (for the base: the probe,
    whose M is the base's); None when there is none yet (the base before its probe is trained), which leaves
    out everything that needs a trained C."""
    was_training = model.training
    out: dict[str, object] = {}
    if attacker is not None and cfg.robustness_images > 0:
        if cfg.robustness_eps:
            eps = sorted({0.0, *cfg.robustness_eps})
            out["robustness"] = robustness_curve(model, attacker, test, eps, cfg.robustness_images, batch_size, device)
            out["robustness_own_C"] = robustness_curve(model, model, test, eps, cfg.robustness_images, batch_size,
                                                       device)
        out.update(gradient_alignment(model, attacker, test, train_eps, cfg.robustness_images, batch_size, device))
    if cfg.ig_images > 0:
        share = ig_mouth_share(model, test, cfg.ig_images, cfg.ig_steps, device)
        if share is not None:
            out.update(share)
    model.train(was_training)
    return out


# The attacked C reads the protected attribute through the target when it is right on fewer than half the images
# whose target differs from their protected label (it follows the target there), or when for a quarter of the images
# its input gradient is within about 37° of ±M's. The paper regime's bases, where ASAC raised DEO, are far past both
# (8–18% and ≈ 0.9); the feature-rich regime's, where ASAC lowered DEO as much as plain fine-tuning, far inside
# (97–98% and 0.26–0.37).
THROUGH_TARGET_ACC = 50.0
ALIGNED_Q75 = 0.8


def probe_warning(report: dict[str, object], target: str, protected: str) -> Optional[str]:
    """A warning when the attacked C, whose numbers `report` holds (the base's), reads `protected` through `target`:
    `protected_ACC_y_ne_a` < THROUGH_TARGET_ACC (percent right on the test images whose two labels differ) or
    `grad_abs_cosine_q75` > ALIGNED_Q75 (upper quartile over images of |cos(∇ₓ CE of C, ∇ₓ CE of M)|). None when
    neither holds or neither number was measured."""
    accuracy, aligned = report.get("protected_ACC_y_ne_a"), report.get("grad_abs_cosine_q75")
    through = isinstance(accuracy, float) and accuracy < THROUGH_TARGET_ACC
    parallel = isinstance(aligned, float) and aligned > ALIGNED_Q75
    if not (through or parallel):
        return None
    measured = [f"right on {accuracy:.1f}% of the test images where {target} differs from {protected}"
                if isinstance(accuracy, float) else "",
                f"|cos(∇C, ∇M)| upper quartile {aligned:.2f}" if isinstance(aligned, float) else ""]
    return (f"the attacked C reads {protected} through {target} ({', '.join(m for m in measured if m)}): its ASACs "
            f"are adversarial examples against M, and ASAC fine-tuning is adversarial training of M's reading of "
            f"{target}; expect it to raise DEO, not lower it (where this held, ASAC raised DEO against the base and "
            f"against plain fine-tuning; where C read {protected} itself, ASAC lowered DEO only as much as plain "
            f"fine-tuning: docs/results.md, the paper's own regime and the feature-rich one)")


def needs_attacker(key: str) -> bool:
    """Whether a result of a model needs the attacked C, so that the base row takes it from the probe: what
    `analyse` measures against it, and its accuracy (`protected_ACC*` of the evaluation; the base's own C is
    untrained)."""
    return key in ("robustness", "robustness_own_C") or key.startswith(
        ("grad_cosine", "grad_abs_cosine", "asac_flips_M", "protected_ACC"))


def curve_metrics(analysis: dict[str, object]) -> dict[str, float]:
    """The robustness curves flattened to scalars, as MLflow and the claims name them: `robust_<column>_eps_<ε>`
    (ASACs of the attacked C) and `robust_own_<column>_eps_<ε>` (ASACs of the model's own C)."""
    out = {}
    for key, prefix in (("robustness", "robust"), ("robustness_own_C", "robust_own")):
        for point in analysis.get(key, []):
            out.update({f"{prefix}_{k}_eps_{point['eps']:g}": float(v) for k, v in point.items() if k != "eps"})
    return out
