"""Images/s of whole fine-tuning epochs on the embedded default, `plain` against `asac`.

The embedded default is `load_config(None)`: the generated dataset (6,000 images, 64×64, bias 0.9),
small_cnn, k = 64, E = {0, 0.001, 0.01}, FGSM, ascending. Stages 1–2 run once (shortened by
--base-epochs / --probe-epochs: the cost of a step does not depend on how well the base is trained, only
the curriculum's chunk sizes do, a little); then `stage3.finetune` runs one epoch per mode, the modes
taking turns for --repeats rounds, each from a fresh copy of the same base. Images/s is the one
`finetune` itself logs (`finetune/images_per_s`: training images over the time of the training loop,
data loading included, validation excluded); the wall time of the whole call is reported beside it.

Usage (from the repository root)::

    python benchmarks/bench_e2e.py [--repeats 3] [--json out.json] [key=value ...config overrides]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from typing import Any, Optional

import torch

from _common import add_common_arguments, describe, machine, markdown_table, median, write_json
from distributed_asac.config import Config, load_config
from distributed_asac.data.build import build_splits
from distributed_asac.data.datasets import Splits
from distributed_asac.stage3 import finetune
from distributed_asac.models import TwoHeadModel, create_model
from distributed_asac.runtime import make_accelerator, seed_everything
from distributed_asac.stages import train_stage

MODES = ("plain", "asac")


class MetricsRecorder:
    """The tracker interface `finetune` and `train_stage` use, keeping the metrics instead of logging them."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.metrics.update(metrics)


def train_base(cfg: Config, splits: Splits, accelerator) -> TwoHeadModel:
    model = create_model(cfg.model.backbone, cfg.model.weights).to(accelerator.device)
    for stage in ("base", "probe"):
        model = train_stage(stage, model, splits, cfg, accelerator, MetricsRecorder())
    return model


def one_epoch(mode: str, base: TwoHeadModel, cfg: Config, splits: Splits, accelerator,
              generator: torch.Generator) -> dict[str, float]:
    run_cfg = copy.deepcopy(cfg)
    run_cfg.finetune.mode, run_cfg.finetune.epochs = mode, 1
    recorder = MetricsRecorder()
    start = time.perf_counter()
    finetune(copy.deepcopy(base), splits.train, splits.valid, run_cfg, accelerator, recorder, generator)
    return {"images_per_s": recorder.metrics["finetune/images_per_s"], "wall_s": time.perf_counter() - start}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-epochs", type=int, default=2, help="stage-1 epochs before timing (default 2)")
    parser.add_argument("--probe-epochs", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=... model.backbone=resnet18")
    add_common_arguments(parser, repeats=3)
    args = parser.parse_args(argv)
    overrides = [f"base.epochs={args.base_epochs}", f"probe.epochs={args.probe_epochs}", "tracking.enabled=false"]
    if args.smoke:
        args.repeats = 1
        overrides += ["data.synthetic_num_images=200", "data.image_size=32", "finetune.batch_size=8",
                      "base.epochs=1", "base.batch_size=16", "probe.batch_size=16"]
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, [*overrides, f"output_dir={out}", *args.overrides])
        if args.smoke and not any(o.startswith("data.root=") for o in args.overrides):
            cfg.data.root = f"{out}/data"
        accelerator = make_accelerator()
        generator = seed_everything(cfg.seed, accelerator)
        splits = build_splits(cfg, accelerator)
        base = train_base(cfg, splits, accelerator)
        info = machine()
        runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                runs[mode].append(one_epoch(mode, base, cfg, splits, accelerator, generator))

    rates = {mode: [r["images_per_s"] for r in runs[mode]] for mode in MODES}
    ratio = median([p / q for p, q in zip(rates["plain"], rates["asac"])])  # asac time / plain time
    result = {
        "images": len(splits.train), "batch_size": cfg.finetune.batch_size, "backbone": cfg.model.backbone,
        "image_size": cfg.data.image_size, "eps": cfg.finetune.eps, "runs": runs,
        "images_per_s": {mode: median(rates[mode]) for mode in MODES},
        "epoch_wall_s": {mode: median([r["wall_s"] for r in runs[mode]]) for mode in MODES},
        "asac_time_over_plain": ratio,
    }
    print(f"machine: {describe(info)}")
    print(f"{result['images']} training images, {cfg.model.backbone}, {cfg.data.image_size}×{cfg.data.image_size}, "
          f"k = {cfg.finetune.batch_size}, E = {{0}} ∪ {cfg.finetune.eps}; medians of {args.repeats} interleaved epochs\n")
    print(markdown_table(["mode", "images/s (training loop)", "epoch wall s (incl. validation)"],
                         [[m, result["images_per_s"][m], result["epoch_wall_s"][m]] for m in MODES]))
    print(f"\nasac epoch time / plain epoch time: {ratio:.2f}")
    payload = {"benchmark": "e2e", "machine": info, "args": {k: str(v) for k, v in vars(args).items()},
               "config_overrides": overrides + list(args.overrides), "results": result}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
