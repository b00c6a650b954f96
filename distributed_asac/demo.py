"""`make demo`: the whole method on the generated dataset, on CPU, in minutes.

Generates the controlled-bias face dataset (once), trains the base classifier M and the probe C, then
fine-tunes copies of the base with plain fine-tuning, ASAC (FGSM) and ASAC (PGD), and prints the
comparison in the layout of the paper's Table 1. `key=value` arguments override the config as everywhere.
"""

from __future__ import annotations

import argparse
import time
from typing import Optional

from .config import load_config
from .errors import exit_on_user_error
from .pipeline import run

# The rows after base and probe: each a stage-3 run from the same base checkpoint.
VARIANTS = [{"mode": "plain"}, {"mode": "asac", "attack": "fgsm"}, {"mode": "asac", "attack": "pgd"}]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distributed_asac.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a YAML config (default: the built-in CPU demo)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. finetune.epochs=1")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with exit_on_user_error():
        run(load_config(args.config, args.overrides), variants=VARIANTS)
    print(f"demo finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
