"""The epoch loop every training stage shares (stages 1–2: stages.py, stage 3: stage3.py).

A stage gives its per-epoch work (train over the progress bar of its prepared loader, evaluate, log, keep the
best epoch); the loop resumes from the newest saved epoch end, names the progress bar, saves the training state
at every epoch end (resume.py) and offers the `stage.epoch_end` pause point after it (failpoints.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .failpoints import failpoint
from .resume import load_training_state, save_training_state

# Told of every finished fine-tuning epoch on the main process, as (stage, epoch, epochs, metrics): a sweep's trial
# registers one that reports the epoch's validation metrics to Ray Tune's scheduler (tune/trials.py), so that a
# hopeless trial can be stopped early; the package itself never imports Ray.
EPOCH_LISTENERS: list[Callable[[str, int, int, dict[str, float]], None]] = []


def epoch_finished(stage: str, epoch: int, epochs: int, metrics: dict[str, float]) -> None:
    """Call every listener with a finished epoch's metrics (epoch 1-based, of `epochs`)."""
    for listener in EPOCH_LISTENERS:
        listener(stage, epoch, epochs, metrics)


@dataclass
class Progress:
    """What a stage carries from epoch to epoch, saved at every epoch end: its bookkeeping (`meta`, JSON: the best
    score so far, ...), the weights of the epoch it keeps so far (`best`; empty while it keeps none) and the tensors
    its training rule carries from step to step (`carried`: GroupDRO's q; empty for most)."""

    meta: dict[str, Any]
    best: dict[str, torch.Tensor]
    carried: dict[str, torch.Tensor] = field(default_factory=dict)


def run_epochs(stage: str, epochs: int, loader, accelerator: Accelerator, state_dir: Optional[Path],
               start: Callable[[], Progress], epoch_work: Callable[[int, tqdm, Progress], None],
               generator: Optional[torch.Generator] = None) -> Progress:
    """Epochs 1..`epochs` of `stage`: `epoch_work(epoch, batches, progress)` for each (epoch 0-based, `batches`
    the loader behind a progress bar on the main process), after the state found in `state_dir` if any (a
    resumed stage restarts the epoch after it), else after `start()`. With `state_dir` the state (with
    `generator`, the curriculum's) is saved there after every epoch. Returns the last epoch's progress."""
    resumed = load_training_state(accelerator, state_dir, loader, generator)
    if resumed is None:
        progress, first = start(), 0
    else:
        (meta, best, carried), first = resumed, resumed[0]["epoch"]
        progress = Progress({k: v for k, v in meta.items() if k != "epoch"}, best, carried)
    for epoch in range(first, epochs):
        bar = tqdm(loader, desc=f"{stage} epoch {epoch + 1}/{epochs}", leave=False,
                   disable=True if not accelerator.is_main_process else None)  # None: off when not a terminal
        epoch_work(epoch, bar, progress)
        save_training_state(accelerator, state_dir, epoch + 1, progress.meta, progress.best, loader, generator,
                            progress.carried)
        failpoint("stage.epoch_end", stage=stage, epoch=epoch + 1)
    accelerator.free_memory()  # drop the accelerator's references so the next stage prepares afresh
    return progress
