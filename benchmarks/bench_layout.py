"""Wall time of the same comparison in two layouts: seeds one after another at N threads, against N seeds at a
time, each in its own process at 1 thread (`python -m distributed_asac.demo --parallel-seeds N`); with
`--sweep FILE`, the same for a sweep's trials (`resources: {cpu: N}` with `max_concurrent: 1`, against
`resources: {cpu: 1}` with `max_concurrent: N`).

Each layout runs the demo's entry point as a user would, in a fresh process (imports and MLflow included), on
one config and one generated dataset (made once beforehand, untimed), each round into its own output folder
and MLflow store. Layouts alternate within a round (a, b, a, b, ...), so that load from other jobs falls on
both alike; the ratio is the median of the per-round ratios. The numbers of the two layouts differ only by
float rounding (1 thread against N; tests/test_comparison.py checks that at equal threads they are equal).

A sweep runs from a copy of its file with only `resources` and `max_concurrent` changed (and the base config's
path made absolute), in its own working directory per round (its base models, trials and MLflow store), on the
one dataset made beforehand.

With `--per-device N ...` (and `--sweep`) it measures packing instead: the sweep's throughput in trials per
hour with N trials on one device at a time, each reserving 1/N of it (`resources.gpu: 1/N` where torch sees a
GPU, with the node's CPUs split N ways; without one the device is the CPU: `resources.cpu: cores/N`), against
one trial at a time. The counts alternate within a round, as the layouts do.

Usage (from the repository root)::

    python benchmarks/bench_layout.py [--seeds 0 1] [--processes 2] [--repeats 2] [--json out.json]
    python benchmarks/bench_layout.py --sweep configs/sweeps/smoke.yaml [--repeats 2]
    python benchmarks/bench_layout.py --sweep configs/sweeps/smoke.yaml --per-device 1 4 8 [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from _common import REPO, describe, machine, markdown_table, median, write_json


def demo_command(config: str, overrides: list[str], layout: str, processes: int) -> list[str]:
    """The demo's command line for one layout: `sequential` at `processes` threads, or `parallel`."""
    flags = ["--threads", str(processes)] if layout == "sequential" else ["--parallel-seeds", str(processes)]
    return [sys.executable, "-m", "distributed_asac.demo", "--config", config, "--rows", "plain,asac_fgsm", *flags,
            *overrides]


def with_own(shared: list[str], own: list[str]) -> list[str]:
    """`shared` overrides less the keys that `own` sets, then `own`: a command line must give each key once."""
    keys = {item.partition("=")[0] for item in own}
    return [*(item for item in shared if item.partition("=")[0] not in keys), *own]


def layout_resources(layout: str, processes: int) -> tuple[dict[str, float], int]:
    """`resources` and `max_concurrent` of one layout: `sequential` one trial at a time at `processes` CPUs, or
    `parallel`, `processes` trials at a time at 1 CPU each."""
    return ({"cpu": processes}, 1) if layout == "sequential" else ({"cpu": 1}, processes)


def packed_resources(per_device: int, cores: int, gpu: bool) -> tuple[dict[str, float], int]:
    """`resources` and `max_concurrent` of `per_device` trials at a time on one device: 1/N of the GPU and of the
    cores each, or without a GPU 1/N of the cores (the CPU is the device)."""
    return {"cpu": cores / per_device, "gpu": 1 / per_device if gpu else 0}, per_device


def sweep_command(spec: dict[str, Any], name: str, resources: dict[str, float], max_concurrent: int, folder: Path,
                  data_root: Path) -> list[str]:
    """The sweep's command line, from a copy of the sweep file `spec` written into `folder` (the run's working
    directory) as `name`, with `resources` and `max_concurrent` in place of the file's."""
    copy = {**spec, "base_config": str(Path(spec["base_config"]).resolve()),
            "resources": {**(spec.get("resources") or {}), **resources}, "max_concurrent": max_concurrent,
            "overrides": {**(spec.get("overrides") or {}), "data.root": str(data_root)}}
    folder.mkdir(parents=True)
    (folder / name).write_text(yaml.safe_dump(copy, sort_keys=False))
    return [sys.executable, str(REPO / "tune" / "sweep.py"), "--config", name]


def timed_run(command: list[str], log: Path, cwd: Path = REPO) -> float:
    """Seconds of one run; its output goes to `log` (named in the error if the run fails)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{' '.join(command)} exited with status {code}; see {log}")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/smoke.yaml", help="the comparison's config (default: smoke)")
    parser.add_argument("--sweep", type=Path, help="time this sweep file's trials instead of the demo's seeds")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="the demo's seeds (default 0 1); with --sweep, in place of the sweep file's")
    parser.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)),
                        help="N: threads of the sequential layout, processes of the parallel one (default: cores)")
    parser.add_argument("--per-device", type=int, nargs="+", metavar="N",
                        help="with --sweep: trials per hour at N trials per device (e.g. 1 4 8) instead of the layouts")
    parser.add_argument("--repeats", type=int, default=2, help="rounds (default 2); median of per-round ratios")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks that it runs, times nothing")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="config overrides for both layouts, e.g. finetune.epochs=2")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.smoke:
        args.repeats = 1
        overrides += ["data.synthetic_num_images=200", "base.epochs=1", "analysis.ig_images=0",
                      "analysis.robustness_images=0"]
    sweep_seeds, args.seeds = args.seeds, args.seeds or [0, 1]
    if args.per_device and not args.sweep:
        parser.error("--per-device packs a sweep's trials: give --sweep FILE")
    info = machine()
    if args.per_device:
        gpu = torch_sees_gpu()
        layouts = tuple(f"{n}_per_device" for n in args.per_device)
        plans = {f"{n}_per_device": packed_resources(n, args.processes, gpu) for n in args.per_device}
    else:
        layouts = ("sequential", "parallel")
        plans = {layout: layout_resources(layout, args.processes) for layout in layouts}
    seconds: dict[str, list[float]] = {layout: [] for layout in layouts}
    config, data_overrides, spec = args.config, [], {}
    if args.sweep:  # the dataset of the sweep's trials: its base config with its own data.* overrides
        spec = yaml.safe_load(args.sweep.read_text())
        if sweep_seeds:
            spec["seeds"] = sweep_seeds
        config = spec["base_config"]
        data_overrides = [f"{k}={json.dumps(v)}" for k, v in (spec.get("overrides") or {}).items() if k.startswith("data.")]
    with tempfile.TemporaryDirectory(prefix="bench-layout-") as tmp:
        work = Path(tmp)
        common = [*overrides, f"data.root={work / 'data'}", f"seeds=[{','.join(map(str, args.seeds))}]"]
        # The dataset, once and untimed: a one-seed run with tracking off generates it.
        warm = with_own([*data_overrides, *common], ["seeds=[0]", "base.epochs=1", f"output_dir={work / 'warm'}",
                                                     "tracking.enabled=false"])
        timed_run(demo_command(config, warm, "sequential", args.processes), work / "warm.log")
        for round_ in range(args.repeats):
            for layout in layouts:
                folder, log = work / f"{layout}-{round_}", work / f"{layout}-{round_}.log"
                if args.sweep:
                    command = [*sweep_command(spec, args.sweep.name, *plans[layout], folder, work / "data"), *overrides]
                    seconds[layout].append(timed_run(command, log, cwd=folder))
                else:
                    run = [*common, f"output_dir={folder}", f"tracking.uri=sqlite:///{folder / 'mlflow.db'}"]
                    seconds[layout].append(timed_run(demo_command(args.config, run, layout, args.processes), log))
    if args.per_device:
        return report_packing(args, info, overrides, seconds, plans, gpu, spec.get("seeds"))
    ratios = [s / p for s, p in zip(seconds["sequential"], seconds["parallel"])]
    result = {"config": str(args.sweep or args.config), "overrides": overrides, "seeds": args.seeds,
              "processes": args.processes, "seconds": seconds, "speedup_parallel_over_sequential": median(ratios),
              "load_average_1m_at_end": os.getloadavg()[0]}
    n, unit = args.processes, "trials" if args.sweep else "seeds"
    print(f"machine: {describe(info)}; load {result['load_average_1m_at_end']:.2f} at the end")
    what = f"the sweep {args.sweep}" if args.sweep else f"{args.config}, seeds {args.seeds}, rows plain and asac_fgsm"
    print(f"{what}; medians of {args.repeats} rounds\n")
    print(markdown_table(["layout", "wall s", "speed-up"], [
        [f"{unit} one after another, {n} threads", median(seconds["sequential"]), 1.0],
        [f"{n} {unit} at a time, 1 thread each", median(seconds["parallel"]), result["speedup_parallel_over_sequential"]],
    ]))
    payload = {"benchmark": "layout", "machine": info, "args": {k: str(v) for k, v in vars(args).items()},
               "results": result}
    write_json(args.json, payload)
    return payload


def torch_sees_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def report_packing(args: argparse.Namespace, info: dict[str, Any], overrides: list[str],
                   seconds: dict[str, list[float]], plans: dict[str, tuple[dict[str, float], int]],
                   gpu: bool, seeds: Optional[list[int]]) -> dict[str, Any]:
    """The --per-device table: trials per hour at each count, and its speed-up over one trial per device (the
    median of per-round ratios)."""
    from tune.spec import load_sweep

    trials = len(load_sweep(args.sweep, seeds=seeds).trials)
    first = next(iter(seconds))
    per_hour = {layout: 3600 * trials / median(s) for layout, s in seconds.items()}
    speedup = {layout: median([a / b for a, b in zip(seconds[first], s)]) for layout, s in seconds.items()}
    device = "one GPU" if gpu else f"the CPU ({args.processes} cores; no GPU: GPU packing is not measured here)"
    result = {"config": str(args.sweep), "overrides": overrides, "trials": trials, "device": device,
              "resources": {layout: plan[0] for layout, plan in plans.items()}, "seconds": seconds,
              "trials_per_hour": per_hour, "speedup_over_first": speedup, "load_average_1m_at_end": os.getloadavg()[0]}
    print(f"machine: {describe(info)}; load {result['load_average_1m_at_end']:.2f} at the end")
    print(f"the sweep {args.sweep}, {trials} trials on {device}; medians of {args.repeats} rounds\n")
    print(markdown_table(["trials per device", "resources per trial", "wall s", "trials per hour", "speed-up"], [
        [layout.split("_")[0], json.dumps(plans[layout][0]), median(seconds[layout]), per_hour[layout], speedup[layout]]
        for layout in seconds]))
    payload = {"benchmark": "layout_packing", "machine": info, "args": {k: str(v) for k, v in vars(args).items()},
               "results": result}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
