"""Train (or reuse) the cached generator of the gan_augment comparator (its engine: gan_engine.py).

    python -m distributed_asac.gan train --config configs/<experiment>.yaml [key=value ...]
"""

from __future__ import annotations

import argparse
from typing import Optional

from .config import help_text, load_cli_config
from .data.build import build_splits
from .errors import UserError, exit_on_user_error
from .gan_engine import generator_file
from .logs import setup_logging
from .runtime import make_accelerator
from .tracking import Tracker, check_store


def main(argv: Optional[list[str]] = None) -> None:
    setup_logging()
    parser = argparse.ArgumentParser(
        prog="python -m distributed_asac.gan", description=__doc__.splitlines()[0], epilog=help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["train"], help="train: train the generator of the config's dataset and "
                        "seed into the cache (or reuse it there) and print its file")
    parser.add_argument("--config", help="experiment YAML (see configs/); defaults: the CPU demo")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. gan.epochs=5")
    args = parser.parse_intermixed_args(argv)  # `train --config x.yaml k=v`: the overrides follow the option
    with exit_on_user_error():
        cfg = load_cli_config(args.config, args.overrides)
        if cfg.gan.checkpoint:
            raise UserError(f"gan.checkpoint is set ({cfg.gan.checkpoint!r}), so there is no generator to train; "
                            "unset it (gan.checkpoint=null) to train one")
        check_store(cfg)
        accelerator = make_accelerator()
        splits = build_splits(cfg, accelerator)
        with Tracker(cfg, "gan", accelerator.is_main_process, {"stage": "gan"}) as tracker:
            path = generator_file(cfg, splits.train, accelerator.device, tracker)
    print(path)


if __name__ == "__main__":
    main()
