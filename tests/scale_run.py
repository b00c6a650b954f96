"""Launched by tests/test_scale.py on 1, 2 or 4 processes: one run of the pipeline with the rows named by
--rows (stage 3 only, from a base checkpoint), as `python -m distributed_asac.finetune` runs one row; with --until
pretrain, stage 0 alone (tests/test_pretrain.py)."""

import argparse

from distributed_asac.config import load_config
from distributed_asac.pipeline import run
from distributed_asac.runtime import close_process_group

if __name__ == "__main__":  # the generator's spawned workers import this module: they must not run it
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--rows", default="plain,asac")
    parser.add_argument("--until", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = None if args.until else [{"mode": row} for row in args.rows.split(",")]
    run(load_config(args.config, args.overrides), variants=rows, until=args.until)
    close_process_group()
