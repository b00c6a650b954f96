"""ASACs: adversarial images that fool the protected classifier C, in pixel space [0, 1] (docs/method.md, ASACs).

An attack is a function `(classifier, x, a, eps_list) -> x_adv` where
- classifier maps images [B, 3, H, W] in [0, 1] to protected logits [B, 2] (C, in eval mode);
- x [k, 3, H, W] are the clean images and a [k] their true protected labels;
- eps_list are the magnitudes E (ε = 0 included by the caller);
- x_adv [|E|, k, 3, H, W] holds the ASAC of image i at magnitude eps_list[j] in x_adv[j, i].

`ATTACKS` maps each name to a factory that binds the attack's own settings from the stage-3 config and nothing
else (`create_attack`): PGD gets its step count, FGSM has none. A new attack is its function plus its factory.

Only the input gets a gradient (`torch.autograd.grad` w.r.t. x): no parameter's .grad is touched, and
callers run C in eval mode so batch-norm running statistics stay as they are.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F

from .registry import Registry

if TYPE_CHECKING:
    from .config import FinetuneConfig

Classifier = Callable[[torch.Tensor], torch.Tensor]
Attack = Callable[[Classifier, torch.Tensor, torch.Tensor, Sequence[float]], torch.Tensor]
ATTACKS: Registry[Callable[["FinetuneConfig"], Attack]] = Registry("attack")


def _input_gradient(classifier: Classifier, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """∇ₓ Σ CE(C(x), a): the sum keeps each image's gradient independent of the batch size."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(classifier(x), a, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(classifier: Classifier, x: torch.Tensor, a: torch.Tensor, eps_list: Sequence[float]) -> torch.Tensor:
    """x' = clip₀¹(x + ε · sign(∇ₓ CE(C(x), a))) for every ε, from ONE gradient (it does not depend on ε)."""
    direction = _input_gradient(classifier, x, a).sign_()  # [k, 3, H, W]
    # One fused x + ε·direction per ε (ε = 0 is x itself): no [|E|, k, 3, H, W] temporary for ε·direction,
    # and torch.cat keeps x's memory format.
    asacs = [x if e == 0 else torch.add(x, direction, alpha=e).clamp_(0.0, 1.0) for e in eps_list]
    return torch.cat(asacs).view(len(eps_list), *x.shape)


def pgd(
    classifier: Classifier,
    x: torch.Tensor,
    a: torch.Tensor,
    eps_list: Sequence[float],
    steps: int = 10,
) -> torch.Tensor:
    """L∞ PGD per ε: uniform random start in [−ε, ε], `steps` signed steps of 2.5·ε/steps, projection onto
    the ε-ball and [0, 1] after each step.

    All non-zero magnitudes run together as one batch of images per step (each image carries its own ε),
    which is the same computation as one PGD per ε in a fraction of the calls. At ε = 0 PGD returns the
    clean image exactly, so those rows cost no gradient.
    """
    n_eps, k = len(eps_list), x.shape[0]
    # Drawn for all |E|·k rows (row j·k + i is image i at eps_list[j]), so that the random stream, and hence
    # every start, is the same whichever magnitudes are zero.
    noise = torch.rand((n_eps * k, *x.shape[1:]), dtype=x.dtype, device=x.device).view(n_eps, k, *x.shape[1:])
    moving = [j for j, e in enumerate(eps_list) if e > 0]
    adv: dict[int, torch.Tensor] = {}  # magnitude index → its ASACs [k, 3, H, W]
    if moving:
        # torch.cat rather than repeat: it keeps x's memory format (channels-last, when finetune asks for it).
        clean = torch.cat([x] * len(moving))  # [m·k, 3, H, W] for the m moving magnitudes
        eps = torch.as_tensor([eps_list[j] for j in moving], dtype=x.dtype, device=x.device)
        eps = eps.repeat_interleave(k).view(-1, 1, 1, 1)  # [m·k, 1, 1, 1]
        labels = a.repeat(len(moving))
        step_size = 2.5 * eps / steps
        # The ε-ball and the [0, 1] box intersect (clean pixels lie in [0, 1]), so projecting onto one and then
        # the other is one clamp onto the intersection, computed once.
        low, high = (clean - eps).clamp_(min=0.0), (clean + eps).clamp_(max=1.0)
        moved = (clean + (noise[moving].flatten(0, 1) * 2 - 1) * eps).clamp_(0.0, 1.0)
        for _ in range(steps):
            grad = _input_gradient(classifier, moved, labels)
            moved = torch.clamp(moved + step_size * grad.sign(), low, high)
        adv = dict(zip(moving, moved.split(k)))
    return torch.cat([adv.get(j, x) for j in range(n_eps)]).view(n_eps, k, *x.shape[1:])


def magnitudes(eps: Sequence[float]) -> list[float]:
    """E = {0} ∪ eps, sorted ascending, without duplicates: ε = 0 (the clean image) is always included."""
    return sorted({0.0, *map(float, eps)})


@ATTACKS.register("fgsm")
def _fgsm(settings: FinetuneConfig) -> Attack:
    return fgsm


@ATTACKS.register("pgd")
def _pgd(settings: FinetuneConfig) -> Attack:
    return partial(pgd, steps=settings.pgd_steps)


def create_attack(name: str, settings: FinetuneConfig) -> Attack:
    """The attack `name` with its own settings taken from `settings` (finetune.pgd_steps for PGD)."""
    return ATTACKS.get(name)(settings)
