"""ASAC fine-tuning throughput on 1, 2 and 4 DDP processes (gloo, CPU): at a fixed global batch, and at today's
fixed per-rank batch.

Three batch modes (`--modes`):
- `global`: the config's meaning since issue 21 — `finetune.batch_size` G is the global batch, each of W ranks
  trains k = G / W, and batch norm normalises over the global batch (`sync_batchnorm: true`, its all-reduces
  included). Images/s at W against W × images/s at 1 is the scaling efficiency of the same experiment.
- `global_local_bn`: the same k = G / W with per-rank batch norm (`sync_batchnorm: false`): the cost of the
  batch-norm all-reduces is the difference to `global`.
- `per_rank`: the meaning before issue 21 — every rank trains k = G, so the global batch grows to G × W (a
  different experiment at each W), per-rank batch norm.

Two or four processes are started the way launch/cpu_ddp.sh starts them (`accelerate launch --config_file
launch/cpu_ddp.yaml` with ACCELERATE_USE_CPU=true; without it they would never talk). Layouts are processes ×
intra-op threads: 1×1 (the baseline), 2×1 and 4×1 by default (on a 2-core machine four ranks share two cores).

Each process runs `stage3.Stage3.train_minibatch` on random images of its own and times every minibatch between
barriers; the step time of a round is the slower rank's. To find the time spent communicating, the same
minibatch is also run without any communication (DDP's `no_sync` and its forward buffer broadcast switched
off; batch norm local) in the same rounds: the fraction is 1 − comm-free / synchronised, per round, median.
That is the exposed cost: all-reduce and broadcast time not hidden behind computation, plus waiting for the
slower rank. One process runs the same two variants with nothing to switch off, which measures the noise
floor. Beside it, |E| all-reduces of a gradient-sized buffer timed alone give the raw communication per
minibatch.

Usage (from the repository root)::

    python benchmarks/bench_distributed.py [--backbones small_cnn resnet18] [--global-batch 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from accelerate import Accelerator

from _common import REPO, add_common_arguments, describe, machine, markdown_table, median, write_json
from distributed_asac.attacks import magnitudes
from distributed_asac.config import Config
from distributed_asac.models import create_model
from distributed_asac.runtime import close_process_group, global_batchnorm, make_accelerator
from distributed_asac.stage3 import build_stage3

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))  # the CLI of this venv


@contextmanager
def no_communication(accelerator: Accelerator, wrapped: torch.nn.Module) -> Iterator[None]:
    """Neither gradient all-reduce (no_sync) nor DDP's pre-forward broadcast of batch-norm buffers."""
    if accelerator.num_processes == 1:
        yield
        return
    # `forward_sync_buffers` is DDP's own switch for the buffer broadcast (set from broadcast_buffers).
    saved, wrapped.forward_sync_buffers = wrapped.forward_sync_buffers, False
    try:
        with accelerator.no_sync(wrapped):
            yield
    finally:
        wrapped.forward_sync_buffers = saved


def worker(args: argparse.Namespace) -> None:
    """One rank: time `rounds` minibatches with and without communication, interleaved; rank 0 writes JSON."""
    torch.set_num_threads(args.threads)
    accelerator = make_accelerator()
    world = accelerator.num_processes
    k = args.global_batch if args.mode == "per_rank" else args.global_batch // world
    cfg = Config()
    torch.manual_seed(0)  # the same initial weights on every rank (DDP broadcasts them anyway)
    model = create_model(args.backbone).to(accelerator.device)
    stage = build_stage3(model, cfg, accelerator, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1 + accelerator.process_index)  # each rank its own images
    x = torch.rand(k, 3, args.image_size, args.image_size, generator=g).to(accelerator.device)
    y, a = (torch.randint(0, 2, (k,), generator=g).to(accelerator.device) for _ in range(2))
    sync_bn = args.mode == "global"
    variants = {"synchronised": lambda: global_batchnorm(model, sync_bn),
                "comm_free": lambda: no_communication(accelerator, stage.wrapped)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.warmup + args.repeats):
        for name, context in variants.items():
            accelerator.wait_for_everyone()
            start = time.perf_counter()
            with context():
                stage.train_minibatch(x, y, a)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - start)
    # The round's step time is the slower rank's: gather every rank's times.
    local = torch.tensor([times[name] for name in variants], dtype=torch.float64, device=accelerator.device)
    slowest = accelerator.gather(local.unsqueeze(0)).amax(0) if world > 1 else local  # [variants, rounds]
    allreduce = allreduce_seconds(model, accelerator, args.repeats) if world > 1 else 0.0
    if accelerator.is_main_process:
        out = {name: slowest[i].tolist() for i, name in enumerate(variants)}
        out.update(world_size=world, local_batch=k, global_batch=k * world, sync_batchnorm=sync_bn, threads=torch.get_num_threads(), allreduce_s=allreduce,
                   parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
                   distributed_type=accelerator.distributed_type.value)
        Path(args.out).write_text(json.dumps(out))
    accelerator.wait_for_everyone()
    close_process_group()


def allreduce_seconds(model: torch.nn.Module, accelerator: Accelerator, repeats: int) -> float:
    """Median time of one all-reduce of a gradient-sized float32 buffer, alone: the raw cost DDP pays (in
    buckets, overlapped with the backward pass) once per optimizer step."""
    buffer = torch.zeros(sum(p.numel() for p in model.parameters() if p.requires_grad), device=accelerator.device)
    seconds = []
    for _ in range(repeats + 1):
        accelerator.wait_for_everyone()
        start = time.perf_counter()
        torch.distributed.all_reduce(buffer)
        seconds.append(time.perf_counter() - start)
    return median(seconds[1:])


def launch(processes: int, threads: int, args: argparse.Namespace, backbone: str, mode: str,
           out: Path) -> dict[str, Any]:
    """Run `worker` in `processes` processes (1: plain python; more: accelerate launch as cpu_ddp.sh does)."""
    cmd = [str(Path(__file__).resolve()), "--worker", "--backbone", backbone, "--mode", mode, "--out", str(out),
           "--global-batch", str(args.global_batch), "--image-size", str(args.image_size),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env["OMP_NUM_THREADS"] = str(threads)
    if processes == 1:
        cmd = [sys.executable, *cmd]
    else:
        env["ACCELERATE_USE_CPU"] = "true"
        cmd = [ACCELERATE, "launch", "--config_file", str(REPO / "launch" / "cpu_ddp.yaml"),
               "--num_processes", str(processes), *cmd]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{processes}-process run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    if result["world_size"] != processes:
        raise RuntimeError(f"asked for {processes} processes, the run saw world size {result['world_size']}")
    return result


def summarise(run: dict[str, Any], steps_per_minibatch: int) -> dict[str, Any]:
    """Throughput and communication share. With one process both variants run the same code: their
    "fraction" is then the noise floor of the measurement, reported as such."""
    sync, free = run["synchronised"], run["comm_free"]
    step = median(sync)
    return {**run, "step_s": step, "images_per_s": run["global_batch"] / step,
            "comm_fraction": median([1.0 - f / s for s, f in zip(sync, free)]),
            "allreduce_fraction": steps_per_minibatch * run["allreduce_s"] / step}


def driver(args: argparse.Namespace) -> dict[str, Any]:
    info = machine()
    info["torch_threads"] = "per layout"  # the workers set their own; this process only launches them
    layouts = [tuple(int(n) for n in layout.split("x")) for layout in args.layouts]
    n_steps = len(magnitudes(Config().finetune.eps))  # optimizer steps, hence all-reduces, per minibatch
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbones:
            for mode in args.modes:
                runs = {f"{p}x{t}": summarise(launch(p, t, args, backbone, mode,
                                                     Path(tmp) / f"{backbone}_{mode}_{p}x{t}.json"), n_steps)
                        for p, t in layouts}
                baseline = runs[args.layouts[0]]
                for run in runs.values():
                    run["throughput_over_first"] = run["images_per_s"] / baseline["images_per_s"]
                    # of W ranks, each as fast as the first layout's ranks: 1.0 is perfect scaling
                    run["scaling_efficiency"] = run["throughput_over_first"] * baseline["world_size"] / run["world_size"]
                results.append({"backbone": backbone, "mode": mode, "runs": runs})
    print(f"machine: {describe(info)}")
    print(f"G = {args.global_batch}, {args.image_size}×{args.image_size}, ASAC (FGSM, |E| = 3); medians of "
          f"{args.repeats} rounds after {args.warmup} warm-up; layouts are processes × threads\n")
    rows = [[r["backbone"], r["mode"], layout, f"{run['local_batch']} × {run['world_size']}", 1e3 * run["step_s"],
             run["images_per_s"], run["throughput_over_first"], run["scaling_efficiency"],
             f"{100 * run['comm_fraction']:.1f}%" + (" (noise floor)" if run["world_size"] == 1 else ""),
             f"{100 * run['allreduce_fraction']:.1f}%" if run["world_size"] > 1 else "—"]
            for r in results for layout, run in r["runs"].items()]
    print(markdown_table(["backbone", "batch", "layout", "k × ranks", "step ms", "images/s",
                          f"throughput / {args.layouts[0]}", "scaling efficiency", "step time in communication",
                          "all-reduces alone / step"], rows))
    payload = {"benchmark": "distributed", "machine": info, "args": {k: str(v) for k, v in vars(args).items()},
               "results": results}
    write_json(args.json, payload)
    return payload


def main(argv: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["small_cnn", "resnet18"])
    parser.add_argument("--global-batch", type=int, default=64,
                        help="G: the global batch (modes global*) or every rank's batch (per_rank); default 64")
    parser.add_argument("--modes", nargs="+", default=["global", "global_local_bn", "per_rank"],
                        choices=["global", "global_local_bn", "per_rank"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "4x1"],
                        help="processes x threads each, e.g. 1x2; ratios are to the first (default 1x1 2x1 4x1)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    add_common_arguments(parser, repeats=4)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    if args.smoke:
        args.backbones, args.global_batch, args.image_size, args.repeats, args.warmup = ["small_cnn"], 8, 16, 1, 1
        args.layouts, args.modes = ["1x1", "2x1"], ["global", "per_rank"]
    return driver(args)


if __name__ == "__main__":
    main()
