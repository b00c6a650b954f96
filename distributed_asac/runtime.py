"""The Accelerator, seeding and optimizers: the infrastructure every stage shares."""

from __future__ import annotations

import math
import os
import random
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, broadcast_object_list, set_seed
from torch.utils.data import DataLoader

from .config import Config, per_rank_batch
from .errors import UserError


def make_accelerator() -> Accelerator:
    """An Accelerator for this process, refusing the silent CPU launch traps (docs/distributed.md).

    On a machine without CUDA the process group must use gloo: DeepSpeed otherwise starts with a backend
    that Accelerate does not see, and its batch-size check fails.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and "WORLD_SIZE" not in os.environ:
        # Accelerate then sets up DeepSpeed without a process group, and the first barrier crashes; as Accelerate
        # reads the variable, so that exactly what it would act on is refused
        raise UserError("ACCELERATE_USE_DEEPSPEED=true, but this process was not started by a launcher (no "
                        "WORLD_SIZE), and DeepSpeed needs one: run `accelerate launch --config_file "
                        "launch/deepspeed_zero2.yaml -m distributed_asac.finetune ...` (docs/distributed.md), or "
                        "unset ACCELERATE_USE_DEEPSPEED to run in this one process")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    gloo = launched > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if gloo else [])
    if launched > 1 and (accelerator.num_processes != launched or accelerator.distributed_type == DistributedType.NO):
        raise UserError(
            f"{launched} processes were launched but Accelerate does not connect them: each would train "
            "alone. On CPU set ACCELERATE_USE_CPU=true for DDP (or use launch/cpu_ddp.sh); see docs/distributed.md"
        )
    return accelerator


T = TypeVar("T")


def on_main_process(accelerator: Accelerator, work: Callable[[], T]) -> Optional[T]:
    """`work()` on the main process alone (None elsewhere); a UserError it raises is raised on every rank, so
    that all stop together instead of the others waiting at the next collective for a rank that left."""
    problem: list[Optional[str]] = [None]
    result = None
    if accelerator.is_main_process:
        try:
            result = work()
        except UserError as err:
            problem = [str(err)]
    if accelerator.num_processes > 1:
        broadcast_object_list(problem)
    if problem[0]:
        raise UserError(problem[0])
    return result


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> Optional[int]:
    """The DeepSpeed ZeRO stage of the launch (from its DeepSpeed config); None without DeepSpeed."""
    if not is_deepspeed(accelerator):
        return None
    return int(accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"])


def train_loader(dataset, global_batch: int, key: str, accelerator: Accelerator, num_workers: int = 0,
                 collate_fn=None, sampler=None) -> DataLoader:
    """A shuffled training loader (last incomplete batch dropped) of each rank's share of the global batch `key`;
    with `sampler` (a row's own draw, e.g. group-balanced), its order instead of the shuffle.

    Its shuffle generator is seeded here from the global RNG, the same draw on rank 0 at any world size, and
    Accelerate hands rank 0's order to every rank, which takes every W-th batch: step s of a run on W processes
    trains the same images as step s on one. (Without its own generator a single process would draw a new seed
    each epoch, while Accelerate gives W > 1 processes one generator: their orders would differ from epoch 2.)"""
    batch = per_rank_batch(global_batch, key, accelerator.num_processes)
    if sampler is not None:
        return DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True, num_workers=num_workers,
                          collate_fn=collate_fn)
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    return DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=num_workers,
                      collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed))


class _AllReduceSum(torch.autograd.Function):
    """A sum over the process group whose gradient is the sum of the ranks' gradients (each rank's loss depends
    on every rank's contribution)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)


def _group_sum(tensor: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        return _AllReduceSum.apply(tensor)
    return tensor


class GlobalBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the global batch: the per-channel sums and, in a
    second pass, the squared deviations from the global mean are summed over the process group, with gradients.
    The same math as torch's SyncBatchNorm, which refuses CPU tensors (gloo); and one formula at every world size,
    one process included (docs/distributed.md: with torch's fused kernel on one process and this on several,
    rounding-level differences grew to 1e-2 in the weights within 21 Adam steps; with one formula, 1e-5).
    Eval-mode forwards are plain batch norm with the running statistics.

    `global_batchnorm` swaps a model's BatchNorm2d modules to this class in place (the same parameters and
    buffers, so DDP's and DeepSpeed's hooks and the checkpoints do not change) and back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        # Statistics in float32 whatever the input's dtype: under bf16 autocast (ACCELERATE_MIXED_PRECISION=bf16)
        # the convolutions hand over bf16, whose 8-bit mantissa would round the sums over the batch, and the
        # running statistics are float32 buffers. The output goes back to the input's dtype, as torch's does.
        dtype, x = x.dtype, x.float()
        dims, shape = (0, 2, 3), (1, -1, 1, 1)
        totals = _group_sum(torch.cat([x.sum(dims), x.new_tensor([x.numel() / x.shape[1]])]))  # [C + 1]: sums, count
        n, mean = totals[-1], totals[:-1] / totals[-1]
        centred = x - mean.view(shape)
        var = _group_sum(centred.pow(2).sum(dims)) / n  # [C], biased, as batch norm normalises
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * n / (n - 1).clamp(min=1), momentum)
        return out.to(dtype)


@contextmanager
def global_batchnorm(model: torch.nn.Module, enabled: bool) -> Iterator[torch.nn.Module]:
    """Inside: `model`'s BatchNorm2d layers normalise training batches over the global batch (`sync_batchnorm`,
    docs/distributed.md); plain BatchNorm2d again after, so that forwards only the main process runs (analysis,
    checkpoints) never wait for a collective. Every rank must run the same training-mode forwards inside."""
    swapped = [m for m in model.modules() if type(m) is torch.nn.BatchNorm2d] if enabled else []
    for module in swapped:
        module.__class__ = GlobalBatchNorm2d
    try:
        yield model
    finally:
        for module in swapped:
            module.__class__ = torch.nn.BatchNorm2d


def seed_everything(seed: int, accelerator: Accelerator) -> torch.Generator:
    """Seed python, numpy and torch (per rank, so ranks draw different PGD starts) and return a CPU generator
    for curriculum shuffles that is the same on every rank."""
    set_seed(seed + accelerator.process_index)
    return torch.Generator().manual_seed(seed)


@contextmanager
def random_state_kept(accelerator: Accelerator) -> Iterator[None]:
    """Inside, draw freely (seed again, train a model on the side); afterwards python's, numpy's and torch's random
    states (this process's CUDA device's included) are what they were, so the run's later draws do not change."""
    python, numpy = random.getstate(), np.random.get_state()
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


def adam(params, lr: float, cfg: Config, weight_decay: float = 0.0, slower=(), scale: float = 1.0) -> torch.optim.Adam:
    """Adam with the paper's settings (docs/method.md, Defaults) over the parameters that require grad; weight_decay
    adds its ℓ2 penalty (stage 3's finetune.weight_decay). The parameters among `slower` (a backbone) take the
    learning rate lr·`scale` (the stages' backbone_lr_scale), in a parameter group of their own."""
    trainable = [p for p in params if p.requires_grad]
    slow = {id(p) for p in slower} if scale != 1.0 else set()
    groups = [{"params": [p for p in trainable if id(p) not in slow]},
              {"params": [p for p in trainable if id(p) in slow], "lr": lr * scale}]
    return torch.optim.Adam([g for g in groups if g["params"]], lr=lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                            weight_decay=weight_decay)


def check_finite(what: str, loss: float, model: torch.nn.Module, lr_key: str, lr: float) -> None:
    """Stop a run whose training diverged (a non-finite loss, or non-finite weights after the last step),
    before a broken model is evaluated, saved as a checkpoint or reported. Every rank sees the same reduced
    loss and (synchronised) weights, so every rank raises."""
    weights_finite = bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())
    if not math.isfinite(loss) or not weights_finite:
        found = f"the training loss is {loss}" if not math.isfinite(loss) else "the weights are no longer finite"
        raise UserError(f"{what}: {found} (training diverged), so this model is not saved or reported; lower {lr_key} "
                        f"(now {lr:g}) or check the data")


def close_process_group() -> None:
    """Destroy the process group at the end of a launched process: left to interpreter exit, gloo's threads can
    abort the rank ("terminate called without an active exception", exit by SIGABRT) after its work is done."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
