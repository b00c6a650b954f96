"""Stage 3: ASAC curriculum fine-tuning of M(θ, ρ) under Accelerate, its comparators, and the CLI.

    accelerate launch -m distributed_asac.finetune --config configs/<experiment>.yaml [key=value ...]
    python -m distributed_asac.finetune --config ... [key=value ...]          # one process

Each rank makes, scores and orders the ASACs of its own k images; every minibatch gives |E| chunks, one
synchronized optimizer step each, on every rank (docs/method.md, Distributed semantics). A training mode is one
registered function that turns a minibatch into the chunks of its optimizer steps.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .attacks import ATTACKS, magnitudes, pgd
from .calibration import Calibrated, calibrate_eps
from .checkpoint import whole_model, whole_state_dict
from .config import Config, FinetuneConfig
from .curriculum import curriculum_chunks, difficulty_scores
from .data.batches import to_pixels, uint8_images
from .errors import UserError
from .failpoints import failpoint
from .losses import asac_loss, plain_loss
from .metrics import HEADLINE
from .models import TwoHeadModel, set_trainable
from .registry import Registry
from .resume import load_training_state, save_training_state
from .runtime import adam, check_finite, close_process_group

# Names the phases of a step in torch.profiler traces (benchmarks/bench_step.py); about a microsecond each
# when no profiler runs. The optimizer labels its own step.
phase = torch.profiler.record_function


@dataclass
class Chunk:
    """The entries of one optimizer step."""

    images: torch.Tensor  # [n, 3, H, W] ASACs (or clean images, for the comparators)
    labels: torch.Tensor  # [n] target labels y
    clean: Optional[torch.Tensor] = None  # [n] minibatch index of each entry's clean image; None: no clean term
    is_clean: Optional[torch.Tensor] = None  # [n] bool: the entry IS its clean image (ε = 0); None: none known


@dataclass
class StepContext:
    """What a mode needs besides the minibatch."""

    cfg: FinetuneConfig
    magnitudes: list[float]  # E, ascending, 0 first
    attacked: TwoHeadModel  # the model whose protected head C the attacks fool (frozen snapshot or live)
    scorer: TwoHeadModel  # the current model (unwrapped), for difficulty scores
    generator: torch.Generator  # curriculum shuffles; the same on every rank
    diagnostics: "Diagnostics"


@dataclass
class Mode:
    make_chunks: Optional[Callable[[StepContext, torch.Tensor, torch.Tensor, torch.Tensor], list[Chunk]]]
    # None: the mode does not fine-tune (the base row)


MODES: Registry[Mode] = Registry("training mode")


@contextmanager
def eval_mode(model: nn.Module):
    """Attacks and scoring run in eval mode (batch-norm statistics untouched), then the mode is restored."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@dataclass
class Diagnostics:
    """Per-epoch sums on this rank; `summary` reduces them across ranks (sums and counts, never means)."""

    n_eps: int
    device: torch.device
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # on `device`
    counts: dict[str, float] = field(default_factory=dict)  # on the host

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().to(self.device, torch.float64)
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def count(self, name: str, value: float) -> None:
        """A number the host already knows (steps, images, entries): kept on the host, so that counting
        costs no host-to-device copy per step; `summary` sends all counts in one tensor."""
        self.counts[name] = self.counts.get(name, 0.0) + value

    def record_asacs(self, scores: torch.Tensor, target_logits: torch.Tensor, protected_logits: torch.Tensor,
                     a: torch.Tensor) -> None:
        """scores [|E|·k], logits [|E|·k, 2] of the current model on the ASACs, a [k]; E[0] = 0 is clean."""
        k = a.numel()
        self.add("ds_sum", scores.view(self.n_eps, k).sum(1))  # [|E|]
        self.count("ds_count", float(k))  # the same for every ε
        predicted = target_logits.argmax(1).view(self.n_eps, k)
        fooled_c = protected_logits.argmax(1).view(self.n_eps, k)[1:] != a  # [|E| − 1, k]
        self.add("attack_success", fooled_c.sum())
        self.add("m_flipped", (predicted[1:] != predicted[0]).sum())
        self.count("asac_count", float(fooled_c.numel()))

    def summary(self, accelerator: Accelerator, eps: list[float], seconds: float) -> dict[str, float]:
        totals = {name: accelerator.reduce(value, "sum") for name, value in sorted(self.sums.items())}
        if self.counts:
            names = sorted(self.counts)
            counts = torch.tensor([self.counts[n] for n in names], dtype=torch.float64, device=self.device)
            totals.update(zip(names, accelerator.reduce(counts, "sum")))
        out: dict[str, float] = {}
        steps = float(totals.pop("steps", torch.tensor(1.0)))
        images = float(totals.pop("images", torch.tensor(0.0)))
        for name in [n for n in totals if n.startswith("loss")]:
            out[name] = float(totals[name]) / max(steps, 1.0)
        if "ds_sum" in totals:
            for j, e in enumerate(eps):
                out[f"mean_DS_eps_{e:g}"] = float(totals["ds_sum"][j] / totals["ds_count"])
            asacs = max(float(totals["asac_count"]), 1.0)
            out["attack_success_rate"] = float(totals["attack_success"]) / asacs
            out["asac_flips_M_rate"] = float(totals["m_flipped"]) / asacs
        out["images_per_s"] = images / max(seconds, 1e-9)
        return out


@MODES.register("base")
def _base() -> Mode:
    return Mode(make_chunks=None)


@MODES.register("asac")
def _asac() -> Mode:
    def make_chunks(ctx: StepContext, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> list[Chunk]:
        n_eps, k = len(ctx.magnitudes), x.shape[0]
        with phase("asac.attack"), eval_mode(ctx.attacked):
            asacs = ATTACKS.get(ctx.cfg.attack)(ctx.attacked.protected_logits, x, a, ctx.magnitudes,
                                                steps=ctx.cfg.pgd_steps)  # [|E|, k, 3, H, W]
        entries = asacs.flatten(0, 1)  # [|E|·k, 3, H, W]; entry j·k + i is image i at E[j]
        labels = y.repeat(n_eps)
        with phase("asac.score"), torch.no_grad(), eval_mode(ctx.scorer):
            target_logits, protected_logits = ctx.scorer(entries)
        with phase("asac.order"):
            scores = difficulty_scores(target_logits, labels)  # [|E|·k]
            ctx.diagnostics.record_asacs(scores, target_logits, protected_logits, a)
            # The one device-to-host copy of the step: chunk sizes depend on the order, so the host needs it.
            steps = curriculum_chunks(scores, ctx.cfg.order, n_eps, ctx.generator).cpu()  # [|E|, k] entry indices
            # Entries j·k + i with j = 0 are ε = E[0] = 0: the clean image itself, bit for bit.
            return [Chunk(entries[rows], labels[rows], clean=rows % k, is_clean=rows < k) for rows in steps]

    return Mode(make_chunks)


@MODES.register("plain")
def _plain() -> Mode:
    """Stage 3's number of steps (|E| per minibatch) on the clean images only: controls for more training."""

    def make_chunks(ctx: StepContext, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> list[Chunk]:
        return [Chunk(x, y)] * len(ctx.magnitudes)

    return Mode(make_chunks)


@MODES.register("adv_augment")
def _adv_augment() -> Mode:
    """Zhang & Sang (2020) as docs/method.md reads it: PGD examples against C at one ε (finetune.adv_eps) added to
    the data, plain cross-entropy, no curriculum, no α. The 2k images are shuffled into |E| steps."""

    def make_chunks(ctx: StepContext, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> list[Chunk]:
        with eval_mode(ctx.attacked):
            adversarial = pgd(ctx.attacked.protected_logits, x, a, [ctx.cfg.adv_eps], steps=ctx.cfg.pgd_steps)[0]
        pool, labels = torch.cat([x, adversarial]), torch.cat([y, y])  # [2k, 3, H, W], [2k]
        order = torch.randperm(len(pool), generator=ctx.generator).to(pool.device)
        return [Chunk(pool[rows], labels[rows]) for rows in order.tensor_split(len(ctx.magnitudes))]

    return Mode(make_chunks)


def chunk_loss(model: nn.Module, x: torch.Tensor, chunk: Chunk, alpha: float) -> dict[str, torch.Tensor]:
    """The loss terms of one step, from one forward pass in which every distinct image of the chunk appears
    once: each clean image once, however many of its entries the chunk holds, and an ε = 0 entry not at all
    beside its clean image, whose logits it shares (clean logits are recomputed every step, as the model
    changes between chunks)."""
    if chunk.clean is None:
        return plain_loss(model(chunk.images)[0], chunk.labels)
    unique, inverse = torch.unique(chunk.clean, return_inverse=True)  # u distinct clean images
    u = len(unique)
    if chunk.is_clean is None:
        logits = model(torch.cat([x[unique], chunk.images]))[0]  # [u + n, 2]
        return asac_loss(logits[:u][inverse], logits[u:], chunk.labels, alpha)
    perturbed = (~chunk.is_clean).nonzero().squeeze(1)  # [m] entries that differ from their clean image
    logits = model(torch.cat([x[unique], chunk.images[perturbed]]))[0]  # [u + m, 2]
    asac_rows = inverse.clone()  # an ε = 0 entry reads its clean image's row ...
    asac_rows[perturbed] = u + torch.arange(len(perturbed), device=perturbed.device)  # ... the others their own
    return asac_loss(logits[inverse], logits[asac_rows], chunk.labels, alpha)


def train_minibatch(mode: Mode, ctx: StepContext, wrapped: nn.Module, optimizer: torch.optim.Optimizer,
                    accelerator: Accelerator, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor,
                    grad_clip: float) -> dict[str, torch.Tensor]:
    """One local minibatch (x [k, 3, H, W], y [k], a [k]): its chunks, one synchronized optimizer step each.
    Returns the last step's loss terms; every step's terms go to `ctx.diagnostics`."""
    if ctx.cfg.channels_last:
        # oneDNN's native layout: convolutions skip their reorders and max-pooling runs several times faster
        # on CPU. The attacks, entries and chunk batches all inherit it from x; parameters keep theirs.
        x = x.contiguous(memory_format=torch.channels_last)
    chunks = mode.make_chunks(ctx, x, y, a)
    wrapped.train()
    if ctx.cfg.batchnorm == "frozen":  # normalise with the base's statistics and never update them
        for module in wrapped.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    for chunk in chunks:
        with phase("step.forward"):
            terms = chunk_loss(wrapped, x, chunk, ctx.cfg.alpha)
        optimizer.zero_grad()
        with phase("step.backward"):
            accelerator.backward(terms["loss"])
        with phase("step.clip"):
            accelerator.clip_grad_norm_(wrapped.parameters(), grad_clip)
        optimizer.step()
        for name, value in terms.items():
            ctx.diagnostics.add(name, value)
        ctx.diagnostics.count("steps", 1.0)
    ctx.diagnostics.count("images", float(len(x)))
    return terms


def model_name(cfg: FinetuneConfig) -> str:
    """The row name of a fine-tuned model: 'asac_fgsm', 'plain', 'adv_augment', 'base'."""
    return f"asac_{cfg.attack}" if cfg.mode == "asac" else cfg.mode


def calibrated_eps(attacked: TwoHeadModel, train_set, ft: FinetuneConfig, accelerator: Accelerator) -> list[Calibrated]:
    """One ε per `ft.attack_success_targets`, chosen against the frozen C on a fixed sample of training images
    (calibration.py). The main process chooses and every rank receives its choice (PGD's random starts differ
    between ranks, and all ranks must train with the same E)."""
    chosen: list[Optional[list[Calibrated]]] = [None]
    if accelerator.is_main_process:
        sample = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))[:ft.calibration_images]
        x, _, a, _ = (torch.stack([torch.as_tensor(train_set[i][j]) for i in sample.tolist()]) for j in range(4))
        with eval_mode(attacked):
            chosen[0] = calibrate_eps(ATTACKS.get(ft.attack), attacked.protected_logits, x.to(accelerator.device),
                                      a.to(accelerator.device), ft.attack_success_targets, steps=ft.pgd_steps)
        tqdm.write("calibrated ε: " + ", ".join(f"{c.eps:.4g} (fools C on {c.rate:.0%}, target {c.target:.0%})"
                                                 for c in chosen[0]))
    broadcast_object_list(chosen)
    return chosen[0]


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
    from .evaluate import evaluate

    ft = cfg.finetune
    mode = MODES.get(ft.mode)()
    if mode.make_chunks is None:
        return model, {}
    # The frozen snapshot of C is taken before `prepare`, so it is a plain module on every backend.
    attacked = copy.deepcopy(model).requires_grad_(False).eval() if ft.attack_model == "frozen" else model
    summary: dict[str, float] = {}
    if ft.eps_mode == "calibrated":
        chosen = calibrated_eps(attacked, train_set, ft, accelerator)
        summary.update({f"calibrated_eps_{c.target:g}": c.eps for c in chosen})
        summary.update({f"calibrated_attack_success_{c.target:g}": c.rate for c in chosen})
        eps = magnitudes([c.eps for c in chosen])
    else:
        eps = magnitudes(ft.eps)
    set_trainable(model, "finetune")
    optimizer = adam(model.parameters(), ft.lr, cfg)
    loader = DataLoader(uint8_images(train_set), batch_size=ft.batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.data.num_workers)
    wrapped, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    attacked = attacked.to(accelerator.device)
    balanced = balanced_subset(valid_set)
    if balanced is None and ft.select == "balanced_valid":
        raise UserError("finetune.select=balanced_valid needs every (target, protected) combination in the "
                        "valid split, and one is empty; use finetune.select=last")

    def evaluate_balanced() -> dict[str, float]:
        if balanced is None:  # no balanced subset: its metrics are undefined
            return dict.fromkeys(HEADLINE, math.nan)
        return evaluate(accelerator, model, balanced, ft.batch_size, num_workers=cfg.data.num_workers).report()

    resumed = load_training_state(accelerator, state_dir, loader, generator)
    if resumed is None:
        deo_history = [evaluate_balanced()["DEO"]]
        best_score, best_state, selected, first_epoch = -1.0, None, ft.epochs, 0
    else:
        (meta, best), first_epoch = resumed, resumed[0]["epoch"]
        deo_history, best_score, selected = meta["deo_history"], meta["best_score"], meta["selected"]
        best_state = best or None
    for epoch in range(first_epoch, ft.epochs):
        diagnostics = Diagnostics(len(eps), accelerator.device)
        ctx = StepContext(ft, eps, attacked, model, generator, diagnostics)
        start = time.perf_counter()
        bar = tqdm(loader, desc=f"finetune epoch {epoch + 1}/{ft.epochs}", leave=False,
                   disable=True if not accelerator.is_main_process else None)  # None: off when not a terminal
        for step, (x, y, a, _) in enumerate(bar, 1):
            x = to_pixels(x)  # uint8 from the loader's workers (data/batches.py)
            terms = train_minibatch(mode, ctx, wrapped, optimizer, accelerator, x, y, a, cfg.grad_clip)
            bar.set_postfix(loss=f"{terms['loss'].item():.3f}")
            failpoint("finetune.step", epoch=epoch + 1, step=step)
        metrics = diagnostics.summary(accelerator, eps, time.perf_counter() - start)
        check_finite(f"finetune epoch {epoch + 1}", metrics.get("loss", 0.0), model, "finetune.lr", ft.lr)
        valid = evaluate(accelerator, model, valid_set, ft.batch_size, num_workers=cfg.data.num_workers).report()
        metrics.update({f"valid_{k}": v for k, v in valid.items()})
        balanced_report = evaluate_balanced()
        metrics.update({f"balanced_valid_{k}": balanced_report[k] for k in HEADLINE})
        deo_history.append(balanced_report["DEO"])
        if ft.select == "balanced_valid" and balanced_report["ACC"] > best_score:
            best_score, best_state, selected = balanced_report["ACC"], whole_state_dict(model), epoch + 1
        tracker.log_metrics({f"finetune/{k}": v for k, v in metrics.items()}, step=epoch)
        if accelerator.is_main_process:
            shown = {k: metrics[k] for k in ("loss", "attack_success_rate", "valid_ACC", "valid_DEO", "balanced_valid_ACC",
                                             "balanced_valid_DEO", "images_per_s")
                     if k in metrics}
            tqdm.write(f"finetune epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
        save_training_state(accelerator, state_dir, epoch + 1,
                            {"deo_history": deo_history, "best_score": best_score, "selected": selected},
                            best_state or {}, loader, generator)
        failpoint("finetune.epoch_end", epoch=epoch + 1)
    accelerator.free_memory()
    steps = [abs(after - before) for before, after in zip(deo_history, deo_history[1:])]
    summary.update(selected_epoch=selected, balanced_valid_DEO_swing=sum(steps) / len(steps) if steps else 0.0)
    tracker.log_metrics({f"finetune/{k}": v for k, v in summary.items()})
    return whole_model(model, cfg.model.backbone, best_state), summary


def main(argv: Optional[list[str]] = None) -> None:
    from .config import help_text
    from .errors import exit_on_user_error
    from .logs import setup_logging
    from .pipeline import run

    setup_logging()
    parser = argparse.ArgumentParser(
        prog="python -m distributed_asac.finetune",
        description="ASAC fine-tuning (stage 3); trains stages 1–2 first when no base_checkpoint is given.",
        epilog=help_text(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="experiment YAML (see configs/); defaults: the CPU demo")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. finetune.alpha=0.3")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        from .config import load_config

        cfg = load_config(args.config, args.overrides)
        if cfg.seeds and cfg.seeds != [cfg.seed]:
            logging.getLogger(__name__).warning(
                "seeds=%s is for the comparison over seeds (python -m distributed_asac.demo); this one run uses "
                "seed=%d", cfg.seeds, cfg.seed)
        run(cfg)
    close_process_group()


if __name__ == "__main__":
    main()
