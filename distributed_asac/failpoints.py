"""Named pause points for fault-injection tests: a test stops a run exactly where it means to, not after a
guessed number of seconds.

A point is inert unless the environment names it (so it costs one dict lookup in normal runs):

    ASAC_PAUSE_AT="stage.epoch_end:stage=finetune,epoch=2;trial.before_record"   points, `name[:key=value,...]`
    ASAC_PAUSE_DIR=/some/folder                                       where the handshake files go

When a process reaches a named point whose `key=value` pairs all match the context it passes, it writes
`<dir>/<name>.<pid>.reached` and blocks until `<dir>/release` exists. The test waits for the `.reached`
file, then does what it wants at that exact point (`kill -9`, SIGINT, or creating `release` to go on).
Matching on the context (the epoch, say) rather than on a hit count keeps a point deterministic when one
process runs several trials. A paused process whose parent dies (the ranks of a killed `accelerate launch`)
exits at once, as the kill would have taken it, instead of waiting forever.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_AT = "ASAC_PAUSE_AT"
PAUSE_DIR = "ASAC_PAUSE_DIR"
RELEASE = "release"


def _parse(spec: str) -> list[tuple[str, dict[str, str]]]:
    points = []
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        name, _, conditions = item.partition(":")
        pairs = dict(pair.split("=", 1) for pair in conditions.split(",") if pair)
        points.append((name, pairs))
    return points


def failpoint(name: str, **context: object) -> None:
    """Pause here if `ASAC_PAUSE_AT` names this point with conditions that `context` meets."""
    spec = os.environ.get(PAUSE_AT)
    if not spec:
        return
    shown = {key: str(value) for key, value in context.items()}
    if not any(point == name and all(shown.get(k) == v for k, v in pairs.items()) for point, pairs in _parse(spec)):
        return
    folder = Path(os.environ.get(PAUSE_DIR, "."))
    parent = os.getppid()
    (folder / f"{name}.{os.getpid()}.reached").write_text(repr(shown))
    while not (folder / RELEASE).exists():  # the test releases (or kills) this process
        if os.getppid() != parent:  # the launcher was killed (its ranks are orphaned): die with it
            os._exit(137)
        time.sleep(0.05)
