"""Evaluation that counts every test image exactly once across ranks (docs/method.md, Distributed semantics).

Rank r evaluates images r, r + W, r + 2W, ... (no padding, no duplicates); per-group counts are summed
across ranks, so the metrics equal a single-process evaluation of the same weights. Per-image predictions
are gathered to the main process only for `predictions.csv`.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, gather_object
from torch.utils.data import DataLoader, Dataset, Subset

from .data.batches import to_pixels, uint8_images
from .metrics import fairness_report, group_counts


@dataclass
class Evaluation:
    counts: torch.Tensor  # int64 [2, 2, 2]: counts[y, a, ŷ] of the target head, summed over ranks
    # int64 [2, 2]: images by [y == a, C right], summed over ranks. Row 1 holds the images whose target equals their
    # protected label (on a biased train split, most of them): a C that reads the protected label off the target is
    # right there and wrong in row 0, so the two rows tell reading the attribute from reading it through the target.
    protected_counts: torch.Tensor
    flips: Optional[int] = None  # images whose ŷ changes on their counterfactual twin (generated data only)
    rows: list[tuple] = field(default_factory=list)  # main process: (image_id, y, a, ŷ, score[, ŷ_twin])

    def report(self) -> dict[str, object]:
        """fairness_report plus the protected head's accuracy (`protected_ACC`; `protected_ACC_y_eq_a` and
        `protected_ACC_y_ne_a` on the images whose target equals / differs from their protected label) and the
        counterfactual flip rate."""
        n = int(self.counts.sum())
        report = fairness_report(self.counts)
        report["protected_ACC"] = _percent(self.protected_counts[:, 1].sum(), self.protected_counts.sum())
        report["protected_ACC_y_eq_a"] = _percent(self.protected_counts[1, 1], self.protected_counts[1].sum())
        report["protected_ACC_y_ne_a"] = _percent(self.protected_counts[0, 1], self.protected_counts[0].sum())
        if self.flips is not None:
            report["CF_flip_rate"] = self.flips / n if n else math.nan
        return report


def _percent(hits: torch.Tensor, images: torch.Tensor) -> float:
    """100·hits/images; NaN where there are no images."""
    return 100.0 * int(hits) / int(images) if int(images) else math.nan


def sync_buffers(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Give every rank the main process's batch-norm statistics.

    DDP keeps parameters equal, but each rank's last training forward updated its own running statistics;
    without this, ranks would evaluate slightly different models.
    """
    if accelerator.num_processes > 1:
        for buffer in model.buffers():
            buffer.copy_(broadcast(buffer.clone(), from_process=0))


@torch.no_grad()
def evaluate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int,
    twins: Optional[Dataset] = None,
    num_workers: int = 0,
) -> Evaluation:
    """Run `model` (unwrapped, eval mode) on this rank's share of `dataset` and reduce across ranks.

    Every rank runs the same number of forward calls (a rank with one image fewer runs one discarded
    forward), because a ZeRO-3 model gathers its parameters collectively in each forward.
    """
    sync_buffers(accelerator, model)
    was_training = model.training
    model.eval()
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    indices = list(range(rank, len(dataset), world))
    n_batches = math.ceil(math.ceil(len(dataset) / world) / batch_size)

    def loader(ds: Dataset) -> DataLoader:
        return DataLoader(Subset(uint8_images(ds), indices), batch_size=batch_size, shuffle=False,
                          num_workers=num_workers)

    counts = torch.zeros(2, 2, 2, dtype=torch.long, device=device)
    protected_counts = torch.zeros(2, 2, dtype=torch.long, device=device)  # [y == a, C right]
    flips = torch.zeros((), dtype=torch.long, device=device)
    rows: list[tuple] = []
    image_ids = getattr(dataset, "image_ids", None)
    batches = zip(loader(dataset), loader(twins)) if twins is not None else ((b, None) for b in loader(dataset))
    done = 0
    for batch, twin_batch in batches:
        x, y, a, idx = (t.to(device) for t in batch)
        x = to_pixels(x)
        target_logits, protected_logits = model(x)  # [b, 2] each
        y_hat = target_logits.argmax(1)
        counts += group_counts(y, a, y_hat)
        cell = (y == a).long() * 2 + (protected_logits.argmax(1) == a).long()  # [b] in 0..3: row-major [2, 2]
        protected_counts += torch.bincount(cell, minlength=4).view(2, 2)
        score = target_logits.softmax(1)[:, 1]
        columns = [idx.tolist(), y.tolist(), a.tolist(), y_hat.tolist(), score.tolist()]
        if twin_batch is not None:
            twin_hat = model(to_pixels(twin_batch[0].to(device)))[0].argmax(1)
            flips += (twin_hat != y_hat).sum()
            columns.append(twin_hat.tolist())
        rows += [(image_ids[r[0]] if image_ids else r[0], *r[1:]) for r in zip(*columns)]
        done += 1
    for _ in range(done, n_batches):  # keep forward counts equal across ranks (see docstring)
        model(dataset[0][0].unsqueeze(0).to(device))
        if twins is not None:
            model(dataset[0][0].unsqueeze(0).to(device))
    model.train(was_training)

    counts = accelerator.reduce(counts, reduction="sum")
    protected_counts = accelerator.reduce(protected_counts, reduction="sum")
    flips = accelerator.reduce(flips, reduction="sum")
    all_rows = gather_object(rows) if world > 1 else rows
    return Evaluation(
        counts=counts.cpu(),
        protected_counts=protected_counts.cpu(),
        flips=int(flips) if twins is not None else None,
        rows=sorted(all_rows, key=lambda r: str(r[0])) if accelerator.is_main_process else [],
    )


def write_results(folder: Path, model_name: str, evaluation: Evaluation,
                  extra: Optional[dict] = None) -> tuple[Path, Path]:
    """`results.json` ({model_name: report, plus `extra`}) and `predictions.csv` (one row per test image)."""
    folder.mkdir(parents=True, exist_ok=True)
    results = folder / "results.json"
    report = {**evaluation.report(), **(extra or {})}
    results.write_text(json.dumps({model_name: report}, indent=2, allow_nan=True))
    predictions = folder / "predictions.csv"
    with predictions.open("w", newline="") as f:
        writer = csv.writer(f)
        header = ["image_id", "y", "a", "y_hat", "score"]
        if evaluation.flips is not None:
            header.append("y_hat_twin")
        writer.writerow(header)
        writer.writerows(evaluation.rows)
    return results, predictions
