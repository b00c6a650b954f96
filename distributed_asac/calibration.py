"""ε calibrated to the attack: pick each magnitude so that its ASACs fool C on a chosen share of images.

The paper's ε were set for 224-pixel CelebA; the same ε means something else at 48 or 64 pixels, or for another
backbone. With `finetune.eps_mode: calibrated`, stage 3 replaces `finetune.eps` by one ε per target in
`finetune.attack_success_targets`: the ε (to `TOLERANCE`) at which its ASACs first make the frozen C mispredict the
protected label on at least that share of a fixed sample of training images (`finetune.calibration_images`).
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
    rate: float  # the share its ASACs actually fool on the calibration images


@torch.no_grad()
def success_rate(attack: Attack, classifier: Classifier, x: torch.Tensor, a: torch.Tensor, eps: float,
                 batch_size: int) -> float:
    """The share of images (x [n, 3, H, W], a [n]) whose ASAC at `eps` makes `classifier` mispredict a."""
    fooled = 0
    for start in range(0, len(x), batch_size):
        xb, ab = x[start:start + batch_size], a[start:start + batch_size]
        adversarial = attack(classifier, xb, ab, [eps])[0]  # [b, 3, H, W]
        fooled += int((classifier(adversarial).argmax(1) != ab).sum())
    return fooled / len(x)


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

    scanned = [(eps, rate(eps)) for eps in SCAN]
    out = []
    for target in targets:
        first = next((i for i, (_, r) in enumerate(scanned) if r >= target), None)
        if first is None:
            best_eps, best = max(scanned, key=lambda point: point[1])
            raise UserError(f"finetune.attack_success_targets: {target} is unreachable: for ε ≤ 1 the ASACs fool C "
                            f"on at most {best:.1%} of the calibration images (at ε = {best_eps:.3g}); lower the target")
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
