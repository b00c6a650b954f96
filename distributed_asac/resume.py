"""Resuming a killed run inside a stage, with the same numbers as an uninterrupted run.

A run folder (`pipeline.run`'s or a comparison's) holds, besides its outputs:

    INCOMPLETE          written when the folder is made, removed when the run finishes: `resume=latest` takes the
                        newest folder of the experiment that still has it
    state.json          kind (pipeline | comparison), world size, fine-tune variants, the MLflow run id of every
                        stage (so a resumed run logs to the same runs) and the test report of every finished stage
    <stage>/state/epoch_<e>/   the training state after epoch e of an unfinished stage (the newest only)

The training state of an epoch end is Accelerate's `save_state` (model as safetensors; optimizer and each rank's
python/numpy/torch RNG states as torch files that Accelerate loads with `weights_only=True`, i.e. without
running pickled code), plus `extra.safetensors` (the best-epoch weights, the curriculum generator and the
DataLoader's shuffle generator as tensors) and `extra.json` (the epoch and the selection bookkeeping). It is
written to a temporary folder and renamed into place, so a kill during a save leaves the previous epoch's state.
A resumed stage restarts the epoch after the newest saved one from that epoch's saved start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from .config import Config, read_saved_config
from .errors import UserError, one_line
from .failpoints import failpoint
from .files import atomic_write
from .locks import acquire, release
from .runtime import on_main_process

INCOMPLETE = "INCOMPLETE"  # marker of a run folder whose run has not finished (killed, failed or running)
STATE = "state.json"
IGNORED_KEYS = ("resume", "tracking.lock_wait_s")  # config keys that may differ between a run and its resumption


class RunState:
    """`state.json` of a run folder: read by every rank, written by the main process only."""

    def __init__(self, folder: Path, data: dict[str, Any], main: bool):
        self.folder, self.data, self.main = folder, data, main

    @classmethod
    def create(cls, folder: Path, kind: str, variants: Optional[list[dict]], accelerator: Accelerator) -> "RunState":
        state = cls(folder, {"kind": kind, "world_size": accelerator.num_processes, "variants": variants or [{}],
                             "mlflow_runs": {}, "finished": {}}, accelerator.is_main_process)
        state._save()
        accelerator.wait_for_everyone()
        return state

    @classmethod
    def load(cls, folder: Path, kind: str, variants: Optional[list[dict]], accelerator: Accelerator) -> "RunState":
        data = read_state(folder)
        if data["kind"] != kind:
            entry = "python -m distributed_asac.demo" if data["kind"] == "comparison" else "python -m distributed_asac.finetune"
            raise UserError(f"resume: {str(folder)!r} is a {data['kind']} run; resume it with {entry}")
        if data["world_size"] != accelerator.num_processes:
            raise UserError(f"resume: {str(folder)!r} ran on {data['world_size']} process(es) but this launch has "
                            f"{accelerator.num_processes}; resume with the same number of processes")
        if data["variants"] != (variants or [{}]):
            raise UserError(f"resume: the fine-tune rows differ from the run's ({data['variants']} in {folder / STATE}, "
                            f"{variants or [{}]} given); pass the same --rows")
        return cls(folder, data, accelerator.is_main_process)

    def _save(self) -> None:
        if self.main:
            atomic_write(self.folder / STATE, json.dumps(self.data, indent=2, allow_nan=True))

    def run_id(self, name: str) -> Optional[str]:
        """The MLflow run of stage `name` if an earlier attempt created it."""
        return self.data["mlflow_runs"].get(name)

    def record_run(self, name: str, run_id: Optional[str]) -> None:
        if run_id is not None and self.data["mlflow_runs"].get(name) != run_id:
            self.data["mlflow_runs"][name] = run_id
            self._save()

    def finished(self, name: str) -> Optional[dict]:
        """The test report of stage `name` if it finished (evaluated, written, logged)."""
        return self.data["finished"].get(name)

    def finish(self, name: str, report: dict, accelerator: Accelerator) -> None:
        """Mark stage `name` finished with its report, then drop its training state (no longer needed)."""
        self.data["finished"][name] = json.loads(json.dumps(report, allow_nan=True))
        self._save()
        accelerator.wait_for_everyone()
        if self.main:
            shutil.rmtree(self.folder / name / "state", ignore_errors=True)


def mark_incomplete(folder: Path) -> None:
    """The marker names the process (pid and host: `tracking.close_killed_runs` reads them) and the way on."""
    (folder / INCOMPLETE).write_text(
        f"this run has not finished (running, killed or failed): pid {os.getpid()} on {socket.gethostname()}; "
        f"continue it with resume=latest or resume={folder} (docs/resume.md)\n")


def mark_complete(folder: Path) -> None:
    (folder / INCOMPLETE).unlink(missing_ok=True)


@contextmanager
def run_lock(folder: Path, accelerator: Accelerator) -> Iterator[None]:
    """The run folder's lock (locks.py), held by the main process for the block: a second `resume=` of this run,
    while this process runs in it, is refused in one line (on every rank) naming this process."""
    path = on_main_process(accelerator, lambda: acquire(folder, "run folder", f"continue it with resume={folder}"))
    try:
        yield
    finally:
        if path is not None:
            release(path)


def read_state(folder: Path) -> dict[str, Any]:
    """The state.json of a run folder, or one UserError naming it when it is damaged (a disk fault, a hand edit;
    the file is written atomically, so never half by a kill)."""
    try:
        data = json.loads((folder / STATE).read_text())
        problem = None if isinstance(data, dict) and isinstance(data.get("kind"), str) else "no run kind in it"
    except (OSError, UnicodeDecodeError, ValueError) as err:
        problem = str(err).splitlines()[0] if str(err) else type(err).__name__
    if problem:
        raise UserError(f"the run state {folder / STATE} is damaged ({problem}), so this run cannot be resumed; "
                        "start a new run (without resume=) or restore the file")
    return data


def saved_config(folder: Path) -> Config:
    """The config.yaml of a run folder, or one UserError naming it when it is damaged."""
    try:
        return read_saved_config(folder / "config.yaml")
    except UserError as err:
        raise UserError(f"the run config {folder / 'config.yaml'} is damaged ({one_line(err)}), so this run cannot "
                        "be resumed; start a new run (without resume=) or restore the file") from None


def _resumable(folder: Path, kind: str) -> bool:
    """Whether `folder` is an unfinished `kind` run that `resume=latest` can take; a damaged one is skipped with
    a warning, so that it never stops the experiment's other runs from being resumed."""
    if not all((folder / name).is_file() for name in (INCOMPLETE, STATE, "config.yaml")):
        return False
    try:
        saved_config(folder)
        return read_state(folder)["kind"] == kind
    except UserError as err:
        logging.getLogger(__name__).warning("resume=latest skips %s: %s", folder, err)
        return False


def find_run(cfg: Config, kind: str) -> Path:
    """The run folder `cfg.resume` names ("latest": the newest unfinished `kind` run of the experiment), checked
    to be resumable and to have been started with the same config (every key but `IGNORED_KEYS`)."""
    if cfg.resume == "latest":
        base = Path(cfg.output_dir) / cfg.experiment
        candidates = [p for p in (base.iterdir() if base.is_dir() else []) if _resumable(p, kind)]
        if not candidates:
            raise UserError(f"resume=latest: no unfinished {kind} run of experiment {cfg.experiment!r} under "
                            f"{str(base)!r} (a run folder with an {INCOMPLETE} marker)")
        folder = max(candidates, key=lambda p: ((p / "config.yaml").stat().st_mtime_ns, p.name))
    else:
        folder = Path(cfg.resume)
        if not (folder / "config.yaml").is_file() or not (folder / STATE).is_file():
            raise UserError(f"resume={cfg.resume}: not a resumable run folder (it needs config.yaml and {STATE}, "
                            f"as written in runs/<experiment>/<run>/); use resume=latest or a run folder")
        found = read_state(folder)["kind"]
        if found != kind:
            entry = "python -m distributed_asac.demo" if found == "comparison" else "python -m distributed_asac.finetune"
            raise UserError(f"resume={cfg.resume}: this folder is a {found} run; resume it with {entry}")
        if not (folder / INCOMPLETE).is_file():
            raise UserError(f"resume={cfg.resume}: this run has finished (no {INCOMPLETE} marker); nothing to resume")
    check_same_config(cfg, folder)
    return folder


def check_same_config(cfg: Config, folder: Path) -> None:
    saved = saved_config(folder).flat()
    given = cfg.flat()
    for key in given:
        if key in IGNORED_KEYS:
            continue
        if saved.get(key) != given[key]:
            raise UserError(f"resume: config key {key!r} differs from the run's: {saved.get(key)!r} in "
                            f"{folder / 'config.yaml'}, {given[key]!r} given; resume with the run's config "
                            "(or start a new run without resume=)")


# ---- the training state of one stage at an epoch end ----

def shuffle_generator(loader) -> Optional[torch.Generator]:
    """The shuffle generator of a prepared loader: with W > 1 processes Accelerate's, synced from rank 0; in one
    process the sampler's own (runtime.train_loader gives every training loader one)."""
    found = getattr(loader, "synchronized_generator", None)
    if found is None:
        found = getattr(getattr(getattr(loader, "batch_sampler", None), "sampler", None), "generator", None)
    return found


def save_training_state(accelerator: Accelerator, folder: Optional[Path], epoch: int, meta: dict[str, Any],
                        tensors: dict[str, torch.Tensor], loader=None, generator: Optional[torch.Generator] = None,
                        carried: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Save the state after `epoch` (1-based) to `folder/epoch_<epoch>` atomically; every rank must call this.
    `tensors` are the kept epoch's weights, `carried` what the training rule carries (the same on every rank)."""
    if folder is None:
        return
    main = accelerator.is_main_process
    tmp, final = folder / f".epoch_{epoch:04d}.tmp", folder / f"epoch_{epoch:04d}"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)  # model, optimizer, this rank's RNG states
    if main:
        extra = {f"best.{name}": t.detach().cpu().contiguous() for name, t in tensors.items()}
        extra.update({f"carried.{name}": t.detach().cpu().contiguous() for name, t in (carried or {}).items()})
        if generator is not None:
            extra["generator.curriculum"] = generator.get_state()
        shuffle = shuffle_generator(loader)
        if shuffle is not None:
            extra["generator.shuffle"] = shuffle.get_state()
        extra["torch_rng.rank0"] = torch.get_rng_state()  # checked after load_state (which fails silently)
        save_file(extra, str(tmp / "extra.safetensors"))
        (tmp / "extra.json").write_text(json.dumps({"epoch": epoch, **meta}, allow_nan=True))
    accelerator.wait_for_everyone()
    if main:
        failpoint("state.before_rename", stage=folder.parent.name, epoch=epoch)  # a kill here keeps the previous state
        os.replace(tmp, final)  # the new state exists whole or not at all
        for old in folder.glob("epoch_*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_training_state(accelerator: Accelerator, folder: Optional[Path], loader=None,
                        generator: Optional[torch.Generator] = None) -> Optional[tuple[dict, dict, dict]]:
    """Restore the newest state in `folder` into the prepared objects, the RNGs, `loader`'s shuffle generator and
    `generator`; returns (meta, best-epoch tensors, carried tensors), or None when there is none (a fresh stage)."""
    states = sorted(folder.glob("epoch_*")) if folder is not None and folder.is_dir() else []
    if not states:
        return None
    latest = states[-1]
    accelerator.load_state(str(latest))
    extra = load_file(str(latest / "extra.safetensors"))
    meta = json.loads((latest / "extra.json").read_text())
    if accelerator.is_main_process and not torch.equal(torch.get_rng_state(), extra["torch_rng.rank0"]):
        raise RuntimeError(f"the random states in {latest} were not restored; cannot resume with the same numbers")
    if generator is not None:
        generator.set_state(extra["generator.curriculum"])
    shuffle = shuffle_generator(loader)
    if shuffle is not None and "generator.shuffle" in extra:
        shuffle.set_state(extra["generator.shuffle"])
    if loader is not None and hasattr(loader, "iteration"):
        loader.iteration = meta["epoch"]
    best = {name.removeprefix("best."): t for name, t in extra.items() if name.startswith("best.")}
    carried = {name.removeprefix("carried."): t for name, t in extra.items() if name.startswith("carried.")}
    return meta, best, carried

