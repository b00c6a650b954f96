"""The fine-tuning loss of Eq. 5, each term returned by name so that all of them are logged the same way."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def asac_loss(clean_logits: torch.Tensor, asac_logits: torch.Tensor, y: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    """Ĵ_α = α · CE(M(x), y) + (1 − α) · CE(M(x'), y), averaged over the n entries of a chunk.

    clean_logits [n, 2] are M's logits on each entry's clean image, asac_logits [n, 2] on its ASAC, y [n].
    Returns {"loss": Ĵ_α, "loss_clean": CE(M(x), y), "loss_asac": CE(M(x'), y)}.
    """
    loss_clean = F.cross_entropy(clean_logits, y)
    loss_asac = F.cross_entropy(asac_logits, y)
    return {"loss": alpha * loss_clean + (1.0 - alpha) * loss_asac, "loss_clean": loss_clean, "loss_asac": loss_asac}


def plain_loss(logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """CE(M(x), y) for the comparators that train on one kind of input without α."""
    return {"loss": F.cross_entropy(logits, y)}
