"""Stage 3: fine-tuning of M(θ, ρ) under Accelerate in one of the training modes of `rows.py` (ASAC or a
comparator), started by `pipeline.run` (the CLI: finetune.py).

Each rank makes, scores and orders the ASACs of its own k images; every minibatch gives |E| chunks, one
synchronized optimizer step each, on every rank (docs/method.md, Distributed semantics). `build_stage3` sets
up what the steps need (the frozen snapshot of C, ε, the trainable parts, the optimizer, `prepare`, the step
context) once, for the pipeline, the benchmarks and the tests alike.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from . import selection, stages  # noqa: F401 - stages fills rows.STAGE_ONE for jtt's prepare hook
from .attacks import create_attack, magnitudes
from .calibration import Calibrated, attack_success, calibrate_eps
from .checkpoint import whole_model, whole_state_dict
from .config import Config, FinetuneConfig
from .data.batches import to_pixels, uint8_images
from .diagnostics import Diagnostics, phase
from .evaluate import evaluate
from .failpoints import failpoint
from .loop import Progress, epoch_finished, run_epochs
from .losses import asac_loss, plain_loss
from .metrics import HEADLINE
from .models import TwoHeadModel, eval_mode, set_trainable
from .rows import MODES, Chunk, ForwardLayout, Mode, StepContext
from .runtime import adam, check_finite, global_batchnorm, train_loader


# The progress bar shows the epoch's running mean loss every this many minibatches: reading it makes the host
# wait for the device, so it is not read after every minibatch (the epoch's summary line has the exact mean).
LOSS_SHOWN_EVERY = 50


def forward_layouts(chunks: list[Chunk], k: int) -> list[ForwardLayout]:
    """The `ForwardLayout` of each of c chunks with a clean term (each of n entries; clean images among the k of
    the minibatch), all computed at once on the chunks' device with fixed-shape ops.

    The host then reads the c·2 batch sizes (u, m) in one copy: the one wait of a minibatch with a clean term.
    It cannot go while the numbers stay as they are: a train-mode batch norm normalises over exactly those
    u + m images, so a batch of fixed shape would change every step's statistics."""
    if not chunks:
        return []
    clean = torch.stack([chunk.clean for chunk in chunks])  # [c, n] minibatch index of each entry's clean image
    is_clean = (torch.stack([chunk.is_clean for chunk in chunks]) if chunks[0].is_clean is not None
                else torch.zeros_like(clean, dtype=torch.bool))  # [c, n]; none known: every entry is perturbed
    present = torch.zeros(len(chunks), k, dtype=torch.bool, device=clean.device).scatter_(1, clean, True)  # [c, k]
    # A stable sort of "absent" lists the present images first in ascending order (torch.unique's result, whose
    # length is data-dependent); a stable sort of is_clean lists the perturbed entries first in ascending order.
    unique = torch.sort((~present).to(torch.uint8), dim=1, stable=True).indices  # [c, k], first u_s per row
    perturbed = torch.sort(is_clean.to(torch.uint8), dim=1, stable=True).indices  # [c, n], first m_s per row
    clean_rows = (present.cumsum(1) - 1).gather(1, clean)  # [c, n] rank of each entry's image among the present
    u, m = present.sum(1), (~is_clean).sum(1)  # [c] each
    asac_rows = torch.where(is_clean, clean_rows, u[:, None] + (~is_clean).cumsum(1) - 1)  # [c, n]
    sizes = torch.stack([u, m], 1).tolist()  # [c, 2] to the host: the minibatch's one device-to-host copy
    return [ForwardLayout(unique[s, :us], perturbed[s, :ms], clean_rows[s], asac_rows[s])
            for s, (us, ms) in enumerate(sizes)]


def fixed_layout(chunk: Chunk, k: int) -> ForwardLayout:
    """The layout of a fixed-shape chunk (finetune.fixed_chunks): its forward batch is all k clean images and all
    n entries, [k + n, 3, H, W] whatever the order, so the host reads nothing; an ε = 0 entry still reads its
    clean image's logits (its own row is forwarded for the shape only, and enters the batch-norm statistics)."""
    own = k + torch.arange(len(chunk.clean), device=chunk.clean.device)  # [n] rows after the k clean images
    asac_rows = own if chunk.is_clean is None else torch.where(chunk.is_clean, chunk.clean, own)
    return ForwardLayout(None, None, chunk.clean, asac_rows)


def chunk_loss(model: nn.Module, x: torch.Tensor, chunk: Chunk, alpha: float) -> dict[str, torch.Tensor]:
    """The loss terms of one step, from one forward pass in which every distinct image of the chunk appears
    once: each clean image once, however many of its entries the chunk holds, and an ε = 0 entry not at all
    beside its clean image, whose logits it shares (clean logits are recomputed every step, as the model
    changes between chunks). A fixed-shape layout (`fixed_layout`) forwards all k clean images and all entries
    instead. A chunk with a clean term and no `layout` yet gets the default one here (one host read)."""
    if chunk.clean is None:
        return (chunk.loss or plain_loss)(model(chunk.images, protected=False)[0], chunk.labels)
    layout = chunk.layout or forward_layouts([chunk], len(x))[0]
    clean = x if layout.unique is None else x[layout.unique]  # [u, 3, H, W] (fixed layout: u = k)
    entries = chunk.images if layout.perturbed is None else chunk.images[layout.perturbed]  # [m, 3, H, W] (m = n)
    logits = model(torch.cat([clean, entries]), protected=False)[0]  # [u + m, 2]
    return asac_loss(logits[layout.clean_rows], logits[layout.asac_rows], chunk.labels, alpha)


def one_step(chunks: list[Chunk]) -> Chunk:
    """All entries of a minibatch's chunks as one step (finetune.steps=per_minibatch, the other reading of
    Algorithm 1): the distinct chunks concatenated (plain fine-tuning repeats one chunk |E| times: one copy).
    For ASAC this is Eq. 5 averaged over all k·|E| entries, and the curriculum order no longer matters."""
    distinct = list({id(chunk): chunk for chunk in chunks}.values())
    if len(distinct) == 1:  # plain, group_dro: one chunk repeated |E| times, its own loss kept
        return distinct[0]
    if any(chunk.loss is not None for chunk in distinct):
        raise ValueError("one_step cannot join chunks that carry their own losses")

    def joined(name: str) -> Optional[torch.Tensor]:
        parts = [getattr(chunk, name) for chunk in distinct]
        return None if parts[0] is None else torch.cat(parts)

    return Chunk(joined("images"), joined("labels"), joined("clean"), joined("is_clean"))


@dataclass
class Stage3:
    """Stage 3 set up by `build_stage3`: each `train_minibatch` call is one local minibatch of training."""

    mode: Mode
    model: TwoHeadModel  # unwrapped: what scoring, evaluation and checkpoints read
    wrapped: nn.Module  # `model` as Accelerate prepared it (DDP, DeepSpeed): what the steps train
    optimizer: torch.optim.Optimizer
    loader: Optional[DataLoader]  # the train split's, prepared; None when built without one
    ctx: StepContext
    accelerator: Accelerator
    grad_clip: float
    summary: dict[str, float] = field(default_factory=dict)  # calibrated ε and their attack-success rates

    def train_minibatch(self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> dict[str, torch.Tensor]:
        """One local minibatch (x [k, 3, H, W], uint8 or float in [0, 1], y [k], a [k]): its chunks, one synchronized
        optimizer step each.
        Returns the last step's loss terms; every step's terms go to `ctx.diagnostics`."""
        ctx, wrapped = self.ctx, self.wrapped
        x = to_pixels(x)  # uint8 from the stage's own loader (data/batches.py); float batches pass unchanged
        if ctx.cfg.channels_last:
            # oneDNN's native layout: convolutions skip their reorders and max-pooling runs several times faster
            # on CPU. The attacks, entries and chunk batches all inherit it from x; parameters keep theirs.
            x = x.contiguous(memory_format=torch.channels_last)
        chunks = self.mode.make_chunks(ctx, x, y, a)
        if ctx.cfg.steps == "per_minibatch":
            chunks = [one_step(chunks)]
        with_clean = [chunk for chunk in chunks if chunk.clean is not None]
        layouts = ([fixed_layout(chunk, len(x)) for chunk in with_clean] if ctx.cfg.fixed_chunks
                   else forward_layouts(with_clean, len(x)))
        for chunk, layout in zip(with_clean, layouts):
            chunk.layout = layout
        wrapped.train()
        if ctx.cfg.batchnorm == "frozen":  # normalise with the base's statistics and never update them
            for module in wrapped.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        for chunk in chunks:
            with phase("step.forward"):
                terms = chunk_loss(wrapped, x, chunk, ctx.cfg.alpha)
            self.optimizer.zero_grad()
            with phase("step.backward"):
                self.accelerator.backward(terms["loss"])
            with phase("step.clip"):
                self.accelerator.clip_grad_norm_(wrapped.parameters(), self.grad_clip)
            self.optimizer.step()
            for name, value in terms.items():
                ctx.diagnostics.add(name, value)
            ctx.diagnostics.count("steps", 1.0)
        ctx.diagnostics.count("images", float(len(x)))
        return terms


def build_stage3(model: TwoHeadModel, cfg: Config, accelerator: Accelerator, generator: torch.Generator,
                 train_set=None, tracker=None) -> Stage3:
    """Stage 3 of `cfg.finetune` on `model`: the attacked model (a frozen snapshot of C, taken before `prepare` so
    that it is a plain module on every backend, or the model itself), E (fixed or calibrated on `train_set`),
    the trainable parts (θ, ρ), Adam, `prepare` (with a shuffled loader of `train_set` when given) and the step
    context. `generator` drives the curriculum shuffles (the same on every rank)."""
    ft = cfg.finetune
    mode = MODES.get(ft.mode)
    if mode.make_chunks is None:
        raise ValueError(f"training mode {ft.mode!r} does not fine-tune")
    attacked = copy.deepcopy(model).requires_grad_(False).eval() if ft.attack_model == "frozen" else model
    summary: dict[str, float] = {}
    if ft.eps_mode == "calibrated":
        chosen = calibrated_eps(attacked, train_set, ft, accelerator)
        summary.update({f"calibrated_eps_{c.target:g}": c.eps for c in chosen})
        summary.update({f"calibrated_attack_success_{c.target:g}": c.rate for c in chosen})
        eps = magnitudes([c.eps for c in chosen])
    else:
        eps = magnitudes(ft.eps)
    prepared = None
    if mode.prepare is not None and train_set is not None:  # before accelerator.prepare: the base as a plain module
        prepared, numbers = mode.prepare(cfg, model, train_set, accelerator, tracker)
        summary.update(numbers)
    set_trainable(model, "finetune")
    optimizer = adam(model.parameters(), ft.lr, cfg, ft.weight_decay)
    loader = None
    if train_set is None:
        wrapped, optimizer = accelerator.prepare(model, optimizer)
    else:
        data, collate = mode.train_data(cfg, train_set) if mode.train_data is not None else (train_set, None)
        sampler = mode.sampler(cfg, data, prepared) if mode.sampler is not None else None
        loader = train_loader(uint8_images(data), ft.batch_size, "finetune.batch_size", accelerator,
                              cfg.data.num_workers, collate, sampler)
        wrapped, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if ft.compile:  # after `prepare`: dynamo then splits a DDP module's graph at its buckets, keeping their overlap
        wrapped = torch.compile(wrapped)
    attacked = attacked.to(accelerator.device)
    ctx = StepContext(ft, eps, create_attack(ft.attack, ft), attacked, model, generator,
                      Diagnostics(len(eps), accelerator.device), prepared)
    return Stage3(mode, model, wrapped, optimizer, loader, ctx, accelerator, cfg.grad_clip, summary)


def attack_sample(train_set, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed sample of n training images (x [n, 3, H, W], a [n]), the same on every rank and in every run of a
    dataset: where ε are calibrated and attack success is measured."""
    sample = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))[:n]
    x, _, a, _ = (torch.stack([torch.as_tensor(train_set[i][j]) for i in sample.tolist()]) for j in range(4))
    return x.to(device), a.to(device)


def calibrated_eps(attacked: TwoHeadModel, train_set, ft: FinetuneConfig, accelerator: Accelerator) -> list[Calibrated]:
    """One ε per `ft.attack_success_targets`, chosen against the frozen C on `attack_sample` (calibration.py). The
    main process chooses and every rank receives its choice (PGD's random starts differ between ranks, and all
    ranks must train with the same E)."""
    chosen: list[Optional[list[Calibrated]]] = [None]
    if accelerator.is_main_process:
        x, a = attack_sample(train_set, ft.calibration_images, accelerator.device)
        with eval_mode(attacked):
            chosen[0] = calibrate_eps(create_attack(ft.attack, ft), attacked.protected_logits, x, a,
                                      ft.attack_success_targets)
        tqdm.write("calibrated ε: " + ", ".join(f"{c.eps:.4g} (attack success {c.rate:.0%}, target {c.target:.0%})"
                                                 for c in chosen[0]))
    broadcast_object_list(chosen)
    return chosen[0]


def measure_attack(ctx: StepContext, x: torch.Tensor, a: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Attack success of the stage's ASACs against the C they are made against (`ctx.attacked`: the frozen snapshot,
    or the live C as it is now) on the fixed sample x [n, 3, H, W], a [n], per non-zero ε of E and on average, with
    that C's clean accuracy beside it (fractions of the n images; docs/method.md, Attack success). Every rank
    measures the whole sample: with `attack_model: live` under ZeRO-3 each forward needs every rank."""
    eps = [e for e in ctx.magnitudes if e > 0]
    devices = [x.device] if x.device.type == "cuda" else []
    # PGD's random starts come from the global stream: fork it, so that measuring leaves training's draws as they were
    with torch.random.fork_rng(devices=devices), eval_mode(ctx.attacked):
        outcome = attack_success(ctx.attack, ctx.attacked.protected_logits, x, a, eps, batch_size)
    rates = {f"attack_success_eps_{e:g}": outcome.rate(j) for j, e in enumerate(eps)}
    return {"attack_success_rate": sum(rates.values()) / len(rates), **rates,
            "attacked_C_clean_accuracy": outcome.clean_accuracy}


def balanced_subset(dataset, seed: int = 0) -> Optional[Subset]:
    """The same number of images from each (target, protected) cell of `dataset`, as many as its smallest
    cell holds, drawn with a fixed seed; None when a cell is empty. On it, accuracy is the mean of the four
    cells' accuracies, so a model that leans on the protected attribute scores no better than one that does
    not (the full valid split, biased like train, would reward the shortcut)."""
    cell = dataset.targets * 2 + dataset.protected_labels  # [n] in 0..3
    order = torch.randperm(len(cell), generator=torch.Generator().manual_seed(seed))
    size = min(int((cell == c).sum()) for c in range(4))
    if size == 0:
        return None
    return Subset(dataset, sorted(i for c in range(4) for i in order[cell[order] == c][:size].tolist()))


def finetune(model: TwoHeadModel, train_set, valid_set, cfg: Config, accelerator: Accelerator, tracker,
             generator: torch.Generator, state_dir: Optional[Path] = None) -> tuple[TwoHeadModel, dict[str, float]]:
    """Stage 3 in place on `model` (θ and ρ); returns it (under ZeRO-3 a fresh whole copy: see `whole_model`)
    and a summary of the epochs. φ stays frozen.

    After every epoch (and once before the first) the model is evaluated on valid and on its balanced
    subset; `finetune.select` says which epoch is kept. The summary holds `selected_epoch` and
    `balanced_valid_DEO_swing`, the mean |DEO_e − DEO_(e−1)| on the balanced subset over consecutive
    epochs (epoch 0 is the starting model): how much the fairness of the model jumps between epochs.

    With `state_dir`, the full training state (with `generator`) is saved there at every epoch end, and a
    state found there is resumed: the epoch after it restarts from its saved start (resume.py)."""
    ft = cfg.finetune
    if MODES.get(ft.mode).fit is not None:  # no minibatch steps: the mode sets the weights itself (dfr)
        return MODES.get(ft.mode).fit(model, train_set, valid_set, cfg, accelerator, tracker)
    if MODES.get(ft.mode).make_chunks is None:
        return model, {}
    stage = build_stage3(model, cfg, accelerator, generator, train_set, tracker)
    summary, eps = stage.summary, stage.ctx.magnitudes
    attack_probe = (attack_sample(train_set, ft.calibration_images, accelerator.device)
                    if stage.mode.reports_attack and len(eps) > 1 else None)
    last_attack: dict[str, float] = {}  # the last epoch's measure_attack
    balanced = balanced_subset(valid_set)  # pipeline.check_splits refused a rule that needs a missing group

    def evaluate_balanced() -> dict[str, float]:
        if balanced is None:  # no balanced subset: its metrics are undefined
            return dict.fromkeys(HEADLINE, math.nan)
        return evaluate(accelerator, model, balanced, ft.batch_size, num_workers=cfg.data.num_workers).report()

    carries = hasattr(stage.ctx.prepared, "carried")  # the rule's own state goes with the epoch's (rows.StepContext)

    def epoch_work(epoch: int, batches: tqdm, progress: Progress) -> None:
        if carries and progress.carried:  # a resumed stage: the state its last finished epoch left
            stage.ctx.prepared.restore(progress.carried)
        diagnostics = stage.ctx.diagnostics = Diagnostics(len(eps), accelerator.device)
        began = time.perf_counter()
        for step, (x, y, a, _) in enumerate(batches, 1):
            stage.train_minibatch(x, y, a)
            if step % LOSS_SHOWN_EVERY == 0 and not batches.disable:  # a host read: not every minibatch
                batches.set_postfix(loss=f"{diagnostics.running_mean('loss'):.3f}")
            failpoint("finetune.step", epoch=epoch + 1, step=step)
        metrics = diagnostics.summary(accelerator, eps, time.perf_counter() - began)
        if attack_probe is not None:
            last_attack.update(measure_attack(stage.ctx, *attack_probe, ft.batch_size))
            metrics.update(last_attack)
        check_finite(f"finetune epoch {epoch + 1}", metrics.get("loss", 0.0), model, "finetune.lr", ft.lr)
        if carries:
            progress.carried = stage.ctx.prepared.carried()
        valid = evaluate(accelerator, model, valid_set, ft.batch_size, num_workers=cfg.data.num_workers).report()
        metrics.update({f"valid_{k}": v for k, v in valid.items()})
        balanced_report = evaluate_balanced()
        metrics.update({f"balanced_valid_{k}": balanced_report[k] for k in HEADLINE})
        meta = progress.meta
        meta["deo_history"].append(balanced_report["DEO"])
        candidate = selection.score(ft.select, metrics)
        if selection.improves(ft.select, candidate, meta["best_score"]):
            meta["best_score"], meta["selected"] = candidate, epoch + 1
            meta["selected_valid"] = {k: v for k, v in metrics.items() if k.startswith(("valid_", "balanced_valid_"))}
            if ft.select != "last":  # the last epoch's weights are the model itself at the end
                progress.best = whole_state_dict(model)
        tracker.log_metrics({f"finetune/{k}": v for k, v in metrics.items()}, step=epoch)
        if accelerator.is_main_process:  # e.g. a Ray Tune trial reporting to its scheduler (tune/trials.py)
            epoch_finished("finetune", epoch + 1, ft.epochs, metrics)
        if accelerator.is_main_process:
            shown = {k: metrics[k] for k in ("loss", "attack_success_rate", "attacked_C_clean_accuracy", "valid_ACC",
                                             "valid_DEO", "balanced_valid_ACC", "balanced_valid_DEO", "images_per_s")
                     if k in metrics}
            tqdm.write(f"finetune epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))

    def start() -> Progress:  # the starting model's fairness on the balanced subset is epoch 0 of the swing
        return Progress({"deo_history": [evaluate_balanced()["DEO"]], "best_score": math.nan, "selected": ft.epochs,
                         "selected_valid": {}}, {})

    with global_batchnorm(model, cfg.sync_batchnorm):  # after build_stage3: its main-process forwards stay local
        progress = run_epochs("finetune", ft.epochs, stage.loader, accelerator, state_dir, start, epoch_work,
                              generator)
    deo_history = progress.meta["deo_history"]
    steps = [abs(after - before) for before, after in zip(deo_history, deo_history[1:])]
    summary.update(selected_epoch=progress.meta["selected"],
                   balanced_valid_DEO_swing=sum(steps) / len(steps) if steps else 0.0)
    # The kept epoch's valid metrics: what a search ranks this setting by (tune/search.py), test never read.
    summary.update({f"selected_{k}": v for k, v in progress.meta.get("selected_valid", {}).items()})
    tracker.log_metrics({f"finetune/{k}": v for k, v in summary.items()})
    summary.update(last_attack)  # in the summary, not logged again: MLflow has every epoch's (frozen C: all equal)
    return whole_model(model, cfg.model.backbone, progress.best or None), summary

