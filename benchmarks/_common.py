"""What every benchmark of this folder shares: interleaved timing with medians, the machine record, tables, JSON.

The machine these run on is shared with other jobs, so absolute times are noisy. Each benchmark therefore
measures the things it compares side by side in one process, in rounds (a, b, c, a, b, c, ...), and reports
medians and ratios of medians: load from elsewhere falls on every contender alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]


def add_common_arguments(parser: argparse.ArgumentParser, repeats: Optional[int]) -> None:
    """--threads, --smoke, --json and (unless `repeats` is None) --repeats, the same in every benchmark."""
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats,
                            help=f"timed rounds; medians reported (default {repeats})")
    # One thread by default: on a machine shared with other jobs, a multi-threaded OpenMP region waits for its
    # descheduled threads, which buries the ratios in noise. Pass --threads N on a quiet machine.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks that it runs, times nothing")
    parser.add_argument("--json", type=Path, help="also write the results here")


def machine() -> dict[str, Any]:
    """The CPU, core count, load, versions and date: what a reader needs to weigh the numbers."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    return {
        "cpu": models[0] if models else platform.processor() or "unknown",
        "usable_cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m_at_start": os.getloadavg()[0],
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def describe(info: Mapping[str, Any]) -> str:
    return (f"{info['cpu']}, {info['usable_cores']} usable cores, torch threads: {info['torch_threads']}, "
            f"load {info['load_average_1m_at_start']:.2f} at start, torch {info['torch']}, {info['date']}")


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""wall: elapsed time. cpu: this process's CPU time, for single-threaded contenders on a loaded machine, where
elapsed time also counts the waits for a core that other jobs hold."""


def interleaved(contenders: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                clock: str = "wall", after: Optional[Mapping[str, Callable[[], Any]]] = None) -> dict[str, list[float]]:
    """Seconds per call of each contender over `repeats` rounds, the contenders taking turns within a round,
    on one of CLOCKS. `after[name]`, if given, runs after each call of that contender, off the clock (the
    bookkeeping a benchmark needs between contenders).

    Each contender first runs `warmup` times untimed (allocator, oneDNN primitive caches, lazy imports).
    On a GPU each timed call starts and ends with a synchronize: kernels are launched asynchronously, so without
    it a call would be charged for the previous one's kernels and not for its own.
    """
    after = after or {}
    for _ in range(warmup):
        for name, fn in contenders.items():
            fn()
            after.get(name, lambda: None)()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    now = CLOCKS[clock]
    for _ in range(repeats):
        for name, fn in contenders.items():
            synchronize()
            start = now()
            fn()
            synchronize()
            times[name].append(now() - start)
            after.get(name, lambda: None)()
    return times


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub table; floats get 3 significant digits."""

    def cell(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path | None, payload: Mapping[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2))
