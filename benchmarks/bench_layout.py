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

Usage (from the repository root)::

    python benchmarks/bench_layout.py [--seeds 0 1] [--processes 2] [--repeats 2] [--json out.json]
    python benchmarks/bench_layout.py --sweep configs/sweeps/smoke.yaml [--repeats 2]
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
from typing import Any

import yaml

from _common import REPO, describe, machine, markdown_table, median, write_json


def demo_command(config: str, overrides: list[str], layout: str, processes: int) -> list[str]:
    """The demo's command line for one layout: `sequential` at `processes` threads, or `parallel`."""
    flags = ["--threads", str(processes)] if layout == "sequential" else ["--parallel-seeds", str(processes)]
    return [sys.executable, "-m", "distributed_asac.demo", "--config", config, "--rows", "plain,asac_fgsm", *flags,
            *overrides]


def sweep_command(spec: dict[str, Any], name: str, layout: str, processes: int, folder: Path,
                  data_root: Path) -> list[str]:
    """The sweep's command line for one layout, from a copy of the sweep file `spec` written into `folder` (the
    run's working directory) as `name`: `sequential` one trial at a time at `processes` CPUs, or `parallel`."""
    copy = {**spec, "base_config": str(Path(spec["base_config"]).resolve()),
            "resources": {**(spec.get("resources") or {}), "cpu": processes if layout == "sequential" else 1},
            "max_concurrent": 1 if layout == "sequential" else processes,
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/smoke.yaml", help="the comparison's config (default: smoke)")
    parser.add_argument("--sweep", type=Path, help="time this sweep file's trials instead of the demo's seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)),
                        help="N: threads of the sequential layout, processes of the parallel one (default: cores)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds (default 2); median of per-round ratios")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks that it runs, times nothing")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="config overrides for both layouts, e.g. finetune.epochs=2")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.smoke:
        args.repeats, args.seeds = 1, [0, 1]
        overrides += ["data.synthetic_num_images=200", "base.epochs=1", "analysis.ig_images=0",
                      "analysis.robustness_images=0"]
    info = machine()
    layouts = ("sequential", "parallel")
    seconds: dict[str, list[float]] = {layout: [] for layout in layouts}
    config, data_overrides, spec = args.config, [], {}
    if args.sweep:  # the dataset of the sweep's trials: its base config with its own data.* overrides
        spec = yaml.safe_load(args.sweep.read_text())
        config = spec["base_config"]
        data_overrides = [f"{k}={json.dumps(v)}" for k, v in (spec.get("overrides") or {}).items() if k.startswith("data.")]
    with tempfile.TemporaryDirectory(prefix="bench-layout-") as tmp:
        work = Path(tmp)
        common = [*overrides, f"data.root={work / 'data'}", f"seeds=[{','.join(map(str, args.seeds))}]"]
        # The dataset, once and untimed: a one-seed run with tracking off generates it.
        timed_run(demo_command(config, [*data_overrides, *common, "seeds=[0]", "base.epochs=1", f"output_dir={work / 'warm'}",
                                        "tracking.enabled=false"], "sequential", args.processes), work / "warm.log")
        for round_ in range(args.repeats):
            for layout in layouts:
                folder, log = work / f"{layout}-{round_}", work / f"{layout}-{round_}.log"
                if args.sweep:
                    command = [*sweep_command(spec, args.sweep.name, layout, args.processes, folder, work / "data"), *overrides]
                    seconds[layout].append(timed_run(command, log, cwd=folder))
                else:
                    run = [*common, f"output_dir={folder}", f"tracking.uri=sqlite:///{folder / 'mlflow.db'}"]
                    seconds[layout].append(timed_run(demo_command(args.config, run, layout, args.processes), log))
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


if __name__ == "__main__":
    main()
