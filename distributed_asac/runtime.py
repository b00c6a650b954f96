"""The Accelerator, seeding and optimizers: the infrastructure every stage shares."""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed

from .config import Config
from .errors import UserError


def make_accelerator() -> Accelerator:
    """An Accelerator for this process, refusing the silent CPU launch traps (docs/distributed.md).

    On a machine without CUDA the process group must use gloo: DeepSpeed otherwise starts with a backend
    that Accelerate does not see, and its batch-size check fails.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    gloo = launched > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if gloo else [])
    if launched > 1 and (accelerator.num_processes != launched or accelerator.distributed_type == DistributedType.NO):
        raise UserError(
            f"{launched} processes were launched but Accelerate does not connect them: each would train "
            "alone. On CPU set ACCELERATE_USE_CPU=true for DDP (or use launch/cpu_ddp.sh); see docs/distributed.md"
        )
    return accelerator


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> Optional[int]:
    """The DeepSpeed ZeRO stage of the launch (from its DeepSpeed config); None without DeepSpeed."""
    if not is_deepspeed(accelerator):
        return None
    return int(accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"])


def seed_everything(seed: int, accelerator: Accelerator) -> torch.Generator:
    """Seed python, numpy and torch (per rank, so ranks draw different PGD starts) and return a CPU generator
    for curriculum shuffles that is the same on every rank."""
    set_seed(seed + accelerator.process_index)
    return torch.Generator().manual_seed(seed)


def adam(params, lr: float, cfg: Config) -> torch.optim.Adam:
    """Adam with the paper's settings (docs/method.md, Defaults) over the parameters that require grad."""
    trainable = [p for p in params if p.requires_grad]
    return torch.optim.Adam(trainable, lr=lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)


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
