"""Difficulty scores and the in-batch curriculum (paper Eq. 4 and Algorithm 1; docs/method.md, Difficulty and curriculum).

A local minibatch of k images and |E| magnitudes gives k·|E| entries, numbered e = j·k + i for image i at
magnitude E[j] (the layout of `attacks`). An order is one registered function of the scores that returns a
permutation of the entries; the permutation is cut into |E| consecutive chunks of k entries, one optimizer
step each, so every order takes the same number of steps.
"""

from __future__ import annotations

from typing import Callable

import torch

from .data.batches import host_to_device
from .registry import Registry

Order = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
ORDERS: Registry[Order] = Registry("curriculum order")


def difficulty_scores(target_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DS(x') = 1 − softmax(M(x'))[y] for logits [n, 2] and labels [n] → scores [n] in [0, 1]."""
    return 1.0 - target_logits.softmax(dim=1).gather(1, y.view(-1, 1)).squeeze(1)


@ORDERS.register("ascending")
def ascending(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Easy first (the default); ties keep entry order."""
    return torch.sort(scores, stable=True).indices


@ORDERS.register("descending")
def descending(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Hard first; ties keep entry order."""
    return torch.sort(scores, descending=True, stable=True).indices


@ORDERS.register("random")
def random(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The paper's "without curriculum" row: a uniform permutation, scores ignored. Drawn from the host generator
    (the same stream on every rank and device), then queued to the scores' device without a wait."""
    return host_to_device(torch.randperm(scores.numel(), generator=generator, device="cpu"), scores.device)


def curriculum_chunks(scores: torch.Tensor, order: str, n_chunks: int, generator: torch.Generator) -> torch.Tensor:
    """Entry indices [n_chunks, k]: row s lists the entries of optimizer step s, in curriculum order."""
    if scores.numel() % n_chunks:
        raise ValueError(f"{scores.numel()} entries cannot be cut into {n_chunks} equal chunks")
    return ORDERS.get(order)(scores, generator).view(n_chunks, -1)
