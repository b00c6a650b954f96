"""The stage-3 command: ASAC fine-tuning (or a comparator) after stages 1–2, as one run.

    accelerate launch -m distributed_asac.finetune --config configs/<experiment>.yaml [key=value ...]
    python -m distributed_asac.finetune --config ... [key=value ...]          # one process

It parses the config and calls `pipeline.run`, which trains stages 1–2 first when no base_checkpoint is given
(stages.py) and then stage 3 (stage3.py).
"""

from __future__ import annotations

import argparse
import logging
from typing import Optional

from .config import help_text, load_cli_config
from .errors import exit_on_user_error, module_command
from .logs import setup_logging
from .pipeline import run
from .runtime import close_process_group


def main(argv: Optional[list[str]] = None) -> None:
    setup_logging()
    parser = argparse.ArgumentParser(
        prog="python -m distributed_asac.finetune",
        description="ASAC fine-tuning (stage 3); trains stages 1–2 first when no base_checkpoint is given.",
        epilog=help_text(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="experiment YAML (see configs/); defaults: the CPU demo")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. finetune.alpha=0.3")
    # intermixed: overrides may come before and after the options, so that the resume command printed on an
    # interrupt (the same line with resume=<folder> at its end) parses wherever the overrides were
    args = parser.parse_intermixed_args(argv)
    with exit_on_user_error(module_command("distributed_asac.finetune", argv)):
        cfg = load_cli_config(args.config, args.overrides)
        if cfg.seeds and cfg.seeds != [cfg.seed]:
            logging.getLogger(__name__).warning(
                "seeds=%s is for the comparison over seeds (python -m distributed_asac.demo); this one run uses "
                "seed=%d", cfg.seeds, cfg.seed)
        run(cfg)
    close_process_group()


if __name__ == "__main__":
    main()
