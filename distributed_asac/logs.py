"""Logging of every entry point: this package's INFO lines (dataset joins, cache builds, ...) on the main rank.

Records below WARNING go to stdout beside the progress lines, warnings and errors to stderr, so that a failed
run's stderr stays the one `error: ...` line. Other ranks log warnings and errors only. Third-party loggers keep
their own settings, but for MLflow's SQL store, which logs every database error with its traceback before
raising it: the raised error still reaches the entry point (a full store as one line, anything else as a
traceback), so the logged copy is silenced.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGERS = ("distributed_asac", "tune")
QUIET = ("mlflow.store.db.utils",)  # loggers that only repeat an error that is raised anyway
_MARK = "_asac_handler"


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the package loggers once per process (idempotent); call it first thing in each `main`."""
    main_rank = os.environ.get("RANK", "0") == "0"
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(logging.Formatter("%(message)s"))
        setattr(handler, _MARK, True)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not getattr(h, _MARK, False)] + [out, err]
        logger.setLevel(level if main_rank else logging.WARNING)
        logger.propagate = False
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.CRITICAL)
