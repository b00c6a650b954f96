"""`make demo`, and the paper's comparison tables: one base, several fine-tuned rows, one table.

    python -m distributed_asac.demo                                   # the CPU demo on the generated dataset
    python -m distributed_asac.demo --config configs/celeba_smiling.yaml --rows plain,adv_augment,asac_fgsm,asac_pgd data.root=...

Generates the controlled-bias face dataset when it is the one configured; then, once per seed of `seeds`,
trains the base classifier M and the probe C (or loads `base_checkpoint`) and fine-tunes a copy of the base
per row; and prints the comparison in the layout of the paper's Table 1 — mean ± 95% interval over seeds —
followed by each row's paired difference from the base and from plain fine-tuning with its verdict
(comparison.py). `key=value` arguments override the config as everywhere.

How the seeds share the machine is not part of the config (it does not change what is computed):
`--parallel-seeds N` runs N seeds at a time, each in its own process at (torch threads) // N threads;
`--threads T` sets the torch threads (default: torch's, one per core). benchmarks/bench_layout.py times
both layouts.
"""

from __future__ import annotations

import argparse
import time
from typing import Optional

import torch

from .comparison import compare
from .config import help_text, load_cli_config
from .errors import UserError, exit_on_user_error, module_command
from .logs import setup_logging
from .registry import suggest
from .rows import fine_tuned_rows
from .runtime import close_process_group

DEMO_ROWS = ("plain", "asac_fgsm")  # asac_pgd, the slowest row, is left to --rows so three seeds fit minutes


def row_variants(rows: str) -> list[dict]:
    """The stage-3 settings of each row named in `rows` (comma-separated; the rows of rows.py)."""
    names, valid = [r.strip() for r in rows.split(",") if r.strip()], fine_tuned_rows()
    if not names:  # no rows would mean the config's own row, which the user did not ask for
        raise UserError(f"--rows {rows!r} names no row; give at least one of {', '.join(valid)}")
    for name in names:
        if name not in valid:
            raise UserError(f"unknown row {name!r} in --rows{suggest(name, list(valid))}")
    return [valid[name] for name in names]


def main(argv: Optional[list[str]] = None) -> None:
    setup_logging()
    parser = argparse.ArgumentParser(prog="python -m distributed_asac.demo", description=__doc__.splitlines()[0],
                                     epilog=help_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML config (default: the built-in CPU demo)")
    parser.add_argument("--rows", default=",".join(DEMO_ROWS), help=f"comma-separated rows of {', '.join(fine_tuned_rows())}")
    parser.add_argument("--parallel-seeds", type=int, default=1, metavar="N",
                        help="seeds run at a time, each in its own process (default 1: one after another)")
    parser.add_argument("--threads", type=int, metavar="T", help="torch threads (default: torch's, one per core)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. finetune.epochs=1")
    # intermixed: overrides may come before and after the options, so that the resume command printed on an
    # interrupt (the same line with resume=<folder> at its end) parses wherever the overrides were
    args = parser.parse_intermixed_args(argv)
    start = time.perf_counter()
    with exit_on_user_error(module_command("distributed_asac.demo", argv)):
        for flag, value in (("--parallel-seeds", args.parallel_seeds), ("--threads", args.threads)):
            if value is not None and value < 1:
                raise UserError(f"{flag} must be at least 1, got {value}")
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        cfg = load_cli_config(args.config, args.overrides)
        compare(cfg, variants=row_variants(args.rows), parallel=args.parallel_seeds)
    close_process_group()
    print(f"finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
