"""Host waits per stage-3 minibatch of every row that trains on minibatches: plain, ASAC (FGSM, PGD, and FGSM with
`finetune.fixed_chunks`) and the mitigation rows resample, group_dro and jtt (dfr has no minibatch: its stage 3 is
one fit of the target head on features read to the host, so it is listed as skipped).

Each row is set up by `stage3.build_stage3` on a small generated dataset, as stage 3 sets itself up (the rows'
`prepare` hooks and samplers included: GroupDRO's weights, JTT's error set, group-balanced minibatches), takes one
minibatch of its own loader (which makes Adam's state), then the same minibatch is counted:

- host reads (`host_syncs.host_reads`), on any device: the calls that would make a GPU's host wait;
- CUDA synchronisations (`host_syncs.cuda_syncs`), on a GPU only: what CUDA's sync debug mode reports, host-to-device
  copies from pageable memory included. Without a GPU the table says so in that column.

Counts do not depend on the image size or the backbone, so the defaults are small everywhere. Nothing is timed.

Usage (from the repository root)::

    python benchmarks/sync_counts.py [--json out.json]
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator

from _common import describe, machine, markdown_table, write_json
from distributed_asac.config import load_config
from distributed_asac.data import synthetic
from distributed_asac.data.batches import to_pixels
from distributed_asac.data.celeba import CelebA
from distributed_asac.host_syncs import cuda_syncs, host_reads, optimizer_step_counters
from distributed_asac.models import create_model
from distributed_asac.rows import MODES, fine_tuned_rows
from distributed_asac.stage3 import build_stage3

# (row, finetune settings besides the row's own): the rows, and fixed chunks, the setting that should read
# nothing
SETTINGS = [("plain", {}), ("asac_fgsm", {}), ("asac_pgd", {}), ("asac_fgsm", {"fixed_chunks": True}),
            ("resample", {}), ("group_dro", {}), ("jtt", {}), ("dfr", {})]


def count_row(row: str, settings: dict[str, Any], args: argparse.Namespace, root: Path,
              accelerator: Accelerator) -> dict[str, Any]:
    """One row's host reads (and CUDA synchronisations on a GPU) of one minibatch of its own loader."""
    cfg = load_config(None, [f"data.root={root}", f"data.image_size={args.image_size}",
                             f"finetune.batch_size={args.batch_size}"])
    cfg.finetune = replace(cfg.finetune, **fine_tuned_rows()[row], **settings)
    counted = {"row": row, "settings": settings}
    if MODES.get(cfg.finetune.mode).make_chunks is None:
        return {**counted, "skipped": "no minibatch step: stage 3 is one fit of the target head on host features"}
    train = CelebA(root, "train", cfg.data.target, cfg.data.protected, args.image_size)
    torch.manual_seed(0)
    stage = build_stage3(create_model(args.backbone), cfg, accelerator, torch.Generator().manual_seed(0),
                         train_set=train)
    x, y, a, _ = next(iter(stage.loader))  # on the device; x uint8 [k, 3, S, S]
    # Before the count: on CPU the uint8 → float conversion goes through numpy (a host copy that waits for nothing).
    x = to_pixels(x)
    stage.train_minibatch(x, y, a)  # makes Adam's state, whose step counters live on the host
    reads = host_reads(lambda: stage.train_minibatch(x, y, a), optimizer_step_counters(stage.optimizer))
    syncs = cuda_syncs(lambda: stage.train_minibatch(x, y, a)) if accelerator.device.type == "cuda" else None
    return {**counted, "host_reads": reads, "cuda_syncs": syncs}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=24, help="k; a multiple of 4 (group-balanced rows)")
    parser.add_argument("--images", type=int, default=240, help="generated images, all splits")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    accelerator, info = Accelerator(), machine()
    with tempfile.TemporaryDirectory(prefix="sync-counts-") as tmp:
        root = Path(tmp) / "data"
        # bias 0.8: every (target, protected) group in train, as the group-balanced samplers need
        synthetic.generate(root, args.images, 0.8, 3, (args.image_size, args.image_size), workers=1)
        rows = [count_row(row, settings, args, root, accelerator) for row, settings in SETTINGS]
    print(f"machine: {describe(info)}; device {accelerator.device}")
    print(f"one minibatch of k = {args.batch_size}, {args.backbone} at {args.image_size} px, after a first one\n")
    print(markdown_table(["row", "settings", "host reads", "CUDA synchronisations"], [
        [r["row"], ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "default",
         r.get("skipped") or (", ".join(r["host_reads"]) or "none"),
         "" if "skipped" in r else ("no GPU" if r["cuda_syncs"] is None else len(r["cuda_syncs"]))]
        for r in rows]))
    if accelerator.device.type != "cuda":
        print("CUDA synchronisations: not counted, no GPU here (CUDA's sync debug mode needs one)")
    payload = {"benchmark": "sync_counts", "machine": info, "args": {k: str(v) for k, v in vars(args).items()},
               "results": {"device": str(accelerator.device), "rows": rows}}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
