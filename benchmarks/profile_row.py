"""Where one fine-tuning epoch of a demo row spends its time: torch.profiler over the whole row's run.

A base and probe are trained first (untimed); then the row (default asac_pgd) runs one fine-tuning epoch from
them through `pipeline.run`, as the demo runs it (its validation and the test evaluation included, analysis
off), under torch.profiler. The table gives milliseconds per phase: the `phase(...)` labels of the stage-3
step (rows.py, stage3.py), the optimizer's own, evaluation (labelled here from outside) and the DataLoader; "other"
is the wall time outside them. Then the heaviest operators by self time.

Usage (from the repository root)::

    python benchmarks/profile_row.py [--row asac_pgd] [--config configs/demo.yaml] [key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _common import add_common_arguments, describe, machine, markdown_table, write_json
from distributed_asac import pipeline, stage3
from distributed_asac.config import load_config
from distributed_asac.errors import exit_on_user_error
from distributed_asac.rows import fine_tuned_rows

EVALUATION = "evaluation (valid, test)"
LOADER = "DataLoader"


def labelled(fn, label: str):
    """`fn` inside a profiler label of its own."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)

    return wrapper


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    rows = fine_tuned_rows()
    parser.add_argument("--row", choices=sorted(rows), default="asac_pgd")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--top", type=int, default=12, help="operators listed (default 12)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=... finetune.batch_size=32")
    add_common_arguments(parser, repeats=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    smoke = ["data.synthetic_num_images=200", "data.image_size=32", "base.epochs=1", "probe.epochs=1",
             "finetune.pgd_steps=2"] if args.smoke else []
    with tempfile.TemporaryDirectory(prefix="profile-row-") as tmp:
        overrides = [f"output_dir={tmp}", "tracking.enabled=false", "seeds=null", "analysis.ig_images=0",
                     "analysis.robustness_images=0", "finetune.epochs=1", *smoke, *args.overrides]
        cfg = load_config(args.config, overrides)
        if cfg.data.name == "synthetic" and not any(o.startswith("data.root=") for o in args.overrides):
            # generated here, not into the config's folder, which may hold the dataset of other sizes
            cfg = load_config(args.config, [f"data.root={Path(tmp) / 'data'}", *overrides])
        base = pipeline.run(cfg, variants=[{"mode": "base"}]).run_dir / "probe"  # base and probe, untimed
        row_cfg = dataclasses.replace(cfg, base_checkpoint=str(base))
        for module in (stage3, pipeline):  # the evaluations a row runs: valid in stage 3, then test
            module.evaluate = labelled(module.evaluate, EVALUATION)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            pipeline.run(row_cfg, variants=[rows[args.row]])
            wall_ms = (time.perf_counter() - start) * 1e3
    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total / 1e3 for e in events
              if e.key.startswith(("asac.", "step.", "Optimizer.")) or e.key == EVALUATION}
    phases[LOADER] = sum(e.cpu_time_total for e in events if e.key.startswith("enumerate(DataLoader)")) / 1e3
    phases["other (Python, checkpoints, setup)"] = max(wall_ms - sum(phases.values()), 0.0)
    total_self = sum(e.self_cpu_time_total for e in events)
    operators = [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
                  "self_percent": 100.0 * e.self_cpu_time_total / total_self}
                 for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
                 if e.key not in phases and not e.key.startswith("enumerate(DataLoader)")][:args.top]
    info = machine()
    print(f"machine: {describe(info)}")
    print(f"{args.row}: one fine-tuning epoch of {args.config} {' '.join(args.overrides)}, "
          f"{wall_ms / 1e3:.1f} s under the profiler\n")
    print(markdown_table(["phase", "ms", "% of the run"],
                         [[name, ms, 100 * ms / wall_ms] for name, ms in sorted(phases.items(), key=lambda p: -p[1])]))
    print()
    print(markdown_table(["operator (self time)", "calls", "ms", "%"],
                         [[o["op"], o["calls"], o["self_ms"], o["self_percent"]] for o in operators]))
    payload = {"benchmark": "profile_row", "machine": info, "args": {k: str(v) for k, v in vars(args).items()},
               "results": {"row": args.row, "wall_ms": wall_ms, "phases_ms": phases, "operators": operators}}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    with exit_on_user_error():
        main()
