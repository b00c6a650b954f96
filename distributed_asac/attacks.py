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

import inspect
from functools import partial
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .registry import Registry

if TYPE_CHECKING:
    from .config import FinetuneConfig

Classifier = Callable[[torch.Tensor], torch.Tensor]
Attack = Callable[[Classifier, torch.Tensor, torch.Tensor, Sequence[float]], torch.Tensor]
ATTACKS: Registry[Callable[["FinetuneConfig"], Attack]] = Registry("attack")


class _EvalBatchNorm(torch.autograd.Function):
    """Eval-mode batch norm whose backward returns the input's gradient only: dx = dy · invstd · w.

    The forward is F.batch_norm itself. PyTorch's CPU backward kernel also reduces dy and dy·(x − mean) over
    every channel for the weight and bias gradients, even when nothing asks for them: two extra passes over
    the activations. This backward computes dx with the kernel's two roundings in its order, invstd =
    1 / sqrt(running_var + eps) in double rounded to the input's dtype, so dx is bit for bit the stock one.
    """

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, eps):
        shape = (1, -1) + (1,) * (x.dim() - 2)  # per channel, broadcast over [B, C, ...]
        invstd = (running_var.double() + eps).sqrt().reciprocal().to(x.dtype).view(shape)
        ctx.save_for_backward(invstd, None if weight is None else weight.view(shape))
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, dy):
        invstd, weight = ctx.saved_tensors
        dx = dy * invstd
        if weight is not None:
            dx.mul_(weight)  # in place: one buffer for dx, not two
        return dx, None, None, None, None, None  # statistics and affine: nothing inside an attack asks for them


_BATCH_NORM_ARGS = inspect.signature(F.batch_norm)


def _cpu_float32(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _channels_last_only(t: torch.Tensor) -> bool:
    """Strides that only channels-last describes (not also NCHW): the layout oneDNN then computes in."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


class _LeanInputGradients(TorchFunctionMode):
    """Inside an attack, the same input gradients through C from less work on CPU, bit for bit.

    Only the input gets a gradient there, and C does not change during one attack, so:
    - eval-mode batch norm runs as _EvalBatchNorm, without the weight and bias reductions;
    - a convolution over channels-last images gets its weight reordered to channels-last once per attack:
      oneDNN reorders it itself otherwise, in every forward and again in every backward (`copy_` of a
      resnet18 512×512×3×3 weight: ~10% of a gradient). The reordered copy is what oneDNN would compute with.
    Everything else runs as usual. float32 on CPU only: what was measured and tested (other dtypes take other
    kernels, other devices were not measured).
    """

    def __init__(self) -> None:
        super().__init__()
        self._reordered: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(weight) → (weight, its copy)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            bound = _BATCH_NORM_ARGS.bind(*args, **kwargs)
            bound.apply_defaults()
            p = bound.arguments
            x, var = p["input"], p["running_var"]
            if not p["training"] and var is not None and _cpu_float32(x, var):
                return _EvalBatchNorm.apply(x, p["running_mean"], var, p["weight"], p["bias"], p["eps"])
        elif func is F.conv2d and len(args) >= 2:
            x, weight = args[0], args[1]
            if _cpu_float32(x, weight) and _channels_last_only(x) and not weight.is_contiguous(
                    memory_format=torch.channels_last):
                if id(weight) not in self._reordered:  # the weight is kept too, so that its id stays its own
                    copy = weight.detach().contiguous(memory_format=torch.channels_last)
                    self._reordered[id(weight)] = (weight, copy)
                args = (x, self._reordered[id(weight)][1], *args[2:])
        return func(*args, **kwargs)


def _input_gradient(classifier: Classifier, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """∇ₓ Σ CE(C(x), a): the sum keeps each image's gradient independent of the batch size. Called inside
    a _LeanInputGradients block (the attacks open one per call)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(classifier(x), a, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(classifier: Classifier, x: torch.Tensor, a: torch.Tensor, eps_list: Sequence[float]) -> torch.Tensor:
    """x' = clip₀¹(x + ε · sign(∇ₓ CE(C(x), a))) for every ε, from ONE gradient (it does not depend on ε)."""
    with _LeanInputGradients():
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
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """L∞ PGD per ε: uniform random start in [−ε, ε], `steps` signed steps of 2.5·ε/steps, projection onto
    the ε-ball and [0, 1] after each step. Starts come from `generator` (torch's global stream when None).

    Each non-zero ε runs as its own batch of k images, exactly the one-PGD-per-ε computation: on CPU one
    batch of |E|·k images cost more per image than |E| batches of k (BENCHMARKS.md). What the magnitudes
    share is done once: the random draw for all of them, and at ε = 0 PGD returns the clean image exactly,
    so that row costs no gradient.
    """
    n_eps = len(eps_list)
    # Drawn for all |E| rows of k images (row j is eps_list[j]), so that the random stream, and hence every
    # start, is the same whichever magnitudes are zero.
    noise = torch.rand((n_eps, *x.shape), dtype=x.dtype, device=x.device, generator=generator)  # [|E|, k, 3, H, W]
    asacs = []
    with _LeanInputGradients():  # one block for every gradient of the call: weights are reordered once
        for j, e in enumerate(eps_list):
            if e == 0:
                asacs.append(x)
                continue
            step = 2.5 * e / steps
            # The ε-ball and the [0, 1] box intersect (clean pixels lie in [0, 1]), so projecting onto one and
            # then the other is one clamp onto the intersection, computed once per ε.
            low, high = (x - e).clamp_(min=0.0), (x + e).clamp_(max=1.0)
            moved = (x + (noise[j] * 2 - 1) * e).clamp_(0.0, 1.0)  # x's memory format (channels-last in stage 3)
            for _ in range(steps):
                # sign ∈ {−1, 0, 1}, so adding step·sign in place rounds as moved + step·sign does.
                moved.add_(_input_gradient(classifier, moved, a).sign_(), alpha=step).clamp_(low, high)
            asacs.append(moved)
    return torch.cat(asacs).view(n_eps, *x.shape)  # torch.cat keeps x's memory format


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
