"""ε calibrated to the attack: pick each magnitude so that its ASACs fool C on a chosen share of images.

The paper's ε were set for 224-pixel CelebA; the same ε means something else at 48 or 64 pixels, or for another
backbone. With `finetune.eps_mode: calibrated`, stage 3 replaces `finetune.eps` by one ε per target in
`finetune.attack_success_targets`: the ε (to `TOLERANCE`) at which its attack success first reaches that share of a
fixed sample of training images (`finetune.calibration_images`). Attack success counts an image only when the
attacked C classifies it correctly when clean and wrongly after the attack: C's own clean errors are not the
attack's doing.
ε ∈ (0, 1] is scanned coarsely, then bisected between the first scan point that reaches the target and the one
before; the rate need not be monotone in ε, so the result is an ε where the rate crosses the target, which is
what a user asks for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .attacks import Attack, Classifier
from .errors import UserError

TOLERANCE = 1e-4  # bisection stops when the ε bracket is this narrow (0.026/255 per pixel)


@dataclass(frozen=True)
class Calibrated:
    target: float  # the share of images whose ASAC should fool C
    eps: float  # the chosen magnitude
    rate: float  # its attack success reached on the calibration images


@dataclass(frozen=True)
class AttackSuccess:
    """What an attack does to the classifier it attacks, on n images, per ε of the call."""

    n: int
    clean_correct: int  # images the attacked C classifies correctly when clean
    fooled: list[int]  # per ε: images C classifies correctly when clean AND wrongly after the attack

    @property
    def clean_accuracy(self) -> float:
        return self.clean_correct / self.n

    def rate(self, j: int = 0) -> float:
        """Attack success at the j-th ε: the share of ALL n images that C gets right clean and wrong attacked.
        An image C already gets wrong is never counted, so the rate is at most `clean_accuracy`."""
        return self.fooled[j] / self.n


@torch.no_grad()
def attack_success(attack: Attack, classifier: Classifier, x: torch.Tensor, a: torch.Tensor, eps_list: Sequence[float],
                   batch_size: int) -> AttackSuccess:
    """Attack success of `attack` against `classifier` on images x [n, 3, H, W] with protected labels a [n], at
    every ε of `eps_list` (docs/method.md, Attack success)."""
    clean_correct, fooled = 0, torch.zeros(len(eps_list), dtype=torch.long)
    for start in range(0, len(x), batch_size):
        xb, ab = x[start:start + batch_size], a[start:start + batch_size]
        right = classifier(xb).argmax(1) == ab  # [b]
        adversarial = attack(classifier, xb, ab, list(eps_list))  # [|E|, b, 3, H, W]
        wrong = classifier(adversarial.flatten(0, 1)).argmax(1).view(len(eps_list), -1) != ab  # [|E|, b]
        clean_correct += int(right.sum())
        fooled += (wrong & right).sum(1).cpu()
    return AttackSuccess(len(x), clean_correct, fooled.tolist())


def success_rate(attack: Attack, classifier: Classifier, x: torch.Tensor, a: torch.Tensor, eps: float,
                 batch_size: int) -> float:
    """Attack success at one ε (`AttackSuccess.rate`)."""
    return attack_success(attack, classifier, x, a, [eps], batch_size).rate()


# Coarse scan before bisection: 1/512 to 1 in factors of √2. The success rate is not monotone in ε (FGSM at
# ε near 1 turns every image into the sign pattern of its gradient, which fools C less than a moderate ε), so
# each target is bracketed between the first scan point that reaches it and the point before.
SCAN = [2.0 ** (k / 2) / 512 for k in range(19)]


def calibrate_eps(attack: Attack, classifier: Classifier, x: torch.Tensor, a: torch.Tensor,
                  targets: Sequence[float], batch_size: int = 256) -> list[Calibrated]:
    """For each target share t, an ε in (0, 1] at which the attack's success rate first reaches t: the first
    scan point that reaches it, narrowed by bisection to `TOLERANCE`. A target no scanned ε reaches is an
    error naming the best rate found."""
    def rate(eps: float) -> float:
        return success_rate(attack, classifier, x, a, eps, batch_size)

    scan = attack_success(attack, classifier, x, a, SCAN, batch_size)  # FGSM: one gradient for every scan point
    scanned = [(eps, scan.rate(j)) for j, eps in enumerate(SCAN)]
    out = []
    for target in targets:
        first = next((i for i, (_, r) in enumerate(scanned) if r >= target), None)
        if first is None:
            best_eps, best = max(scanned, key=lambda point: point[1])
            raise UserError(f"finetune.attack_success_targets: {target} is unreachable: for ε ≤ 1 the ASACs fool C "
                            f"on at most {best:.1%} of the calibration images (at ε = {best_eps:.3g}; C is right on "
                            f"{scan.clean_accuracy:.1%} of them when clean, the most any ε can reach); lower the target")
        low = scanned[first - 1][0] if first else 0.0
        high, reached = scanned[first]  # rate(low) < target <= rate(high)
        while high - low > TOLERANCE:
            middle = (low + high) / 2
            value = rate(middle)
            if value >= target:
                high, reached = middle, value
            else:
                low = middle
        out.append(Calibrated(target, high, reached))
    return out
