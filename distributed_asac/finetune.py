"""Stage 3: ASAC curriculum fine-tuning of M(θ, ρ) under Accelerate, its comparators, and the CLI.

    accelerate launch -m distributed_asac.finetune --config configs/<experiment>.yaml [key=value ...]
    python -m distributed_asac.finetune --config ... [key=value ...]          # one process

Each rank makes, scores and orders the ASACs of its own k images; every minibatch gives |E| chunks, one
synchronized optimizer step each, on every rank (METHOD.md, Distributed semantics). A training mode is one
registered function that turns a minibatch into the chunks of its optimizer steps.
"""

from __future__ import annotations

import argparse
import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .attacks import ATTACKS, magnitudes, pgd
from .config import Config, FinetuneConfig
from .curriculum import curriculum_chunks, difficulty_scores
from .losses import asac_loss, plain_loss
from .models import TwoHeadModel, set_trainable
from .registry import Registry
from .runtime import adam


@dataclass
class Chunk:
    """The entries of one optimizer step."""

    images: torch.Tensor  # [n, 3, H, W] ASACs (or clean images, for the comparators)
    labels: torch.Tensor  # [n] target labels y
    clean: Optional[torch.Tensor] = None  # [n] minibatch index of each entry's clean image; None: no clean term


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
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().to(self.device, torch.float64)
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def record_asacs(self, scores: torch.Tensor, target_logits: torch.Tensor, protected_logits: torch.Tensor,
                     a: torch.Tensor) -> None:
        """scores [|E|·k], logits [|E|·k, 2] of the current model on the ASACs, a [k]; E[0] = 0 is clean."""
        k = a.numel()
        self.add("ds_sum", scores.view(self.n_eps, k).sum(1))  # [|E|]
        self.add("ds_count", torch.full((self.n_eps,), float(k)))
        predicted = target_logits.argmax(1).view(self.n_eps, k)
        fooled_c = protected_logits.argmax(1).view(self.n_eps, k)[1:] != a  # [|E| − 1, k]
        self.add("attack_success", fooled_c.sum())
        self.add("m_flipped", (predicted[1:] != predicted[0]).sum())
        self.add("asac_count", torch.tensor(float(fooled_c.numel())))

    def summary(self, accelerator: Accelerator, eps: list[float], seconds: float) -> dict[str, float]:
        totals = {name: accelerator.reduce(value, "sum") for name, value in sorted(self.sums.items())}
        out: dict[str, float] = {}
        steps = float(totals.pop("steps", torch.tensor(1.0)))
        images = float(totals.pop("images", torch.tensor(0.0)))
        for name in [n for n in totals if n.startswith("loss")]:
            out[name] = float(totals[name]) / max(steps, 1.0)
        if "ds_sum" in totals:
            for j, e in enumerate(eps):
                out[f"mean_DS_eps_{e:g}"] = float(totals["ds_sum"][j] / totals["ds_count"][j])
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
        with eval_mode(ctx.attacked):
            asacs = ATTACKS.get(ctx.cfg.attack)(ctx.attacked.protected_logits, x, a, ctx.magnitudes,
                                                steps=ctx.cfg.pgd_steps)  # [|E|, k, 3, H, W]
        entries = asacs.flatten(0, 1)  # [|E|·k, 3, H, W]; entry j·k + i is image i at E[j]
        labels = y.repeat(n_eps)
        with torch.no_grad(), eval_mode(ctx.scorer):
            target_logits, protected_logits = ctx.scorer(entries)
        scores = difficulty_scores(target_logits, labels)  # [|E|·k]
        ctx.diagnostics.record_asacs(scores, target_logits, protected_logits, a)
        steps = curriculum_chunks(scores, ctx.cfg.order, n_eps, ctx.generator)  # [|E|, k] entry indices
        return [Chunk(entries[rows], labels[rows], clean=rows % k) for rows in steps]

    return Mode(make_chunks)


@MODES.register("plain")
def _plain() -> Mode:
    """Stage 3's number of steps (|E| per minibatch) on the clean images only: controls for more training."""

    def make_chunks(ctx: StepContext, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> list[Chunk]:
        return [Chunk(x, y)] * len(ctx.magnitudes)

    return Mode(make_chunks)


@MODES.register("adv_augment")
def _adv_augment() -> Mode:
    """Zhang & Sang (2020) as METHOD.md reads it: PGD examples against C at one ε (finetune.adv_eps) added to
    the data, plain cross-entropy, no curriculum, no α. The 2k images are shuffled into |E| steps."""

    def make_chunks(ctx: StepContext, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> list[Chunk]:
        with eval_mode(ctx.attacked):
            adversarial = pgd(ctx.attacked.protected_logits, x, a, [ctx.cfg.adv_eps], steps=ctx.cfg.pgd_steps)[0]
        pool, labels = torch.cat([x, adversarial]), torch.cat([y, y])  # [2k, 3, H, W], [2k]
        order = torch.randperm(len(pool), generator=ctx.generator).to(pool.device)
        return [Chunk(pool[rows], labels[rows]) for rows in order.tensor_split(len(ctx.magnitudes))]

    return Mode(make_chunks)


def chunk_loss(model: nn.Module, x: torch.Tensor, chunk: Chunk, alpha: float) -> dict[str, torch.Tensor]:
    """The loss terms of one step, from one forward pass: each clean image in the chunk is forwarded once
    (clean logits are recomputed every step, as the model changes between chunks)."""
    if chunk.clean is None:
        return plain_loss(model(chunk.images)[0], chunk.labels)
    unique, inverse = torch.unique(chunk.clean, return_inverse=True)
    logits = model(torch.cat([x[unique], chunk.images]))[0]  # [u + n, 2]
    return asac_loss(logits[: len(unique)][inverse], logits[len(unique):], chunk.labels, alpha)


def model_name(cfg: FinetuneConfig) -> str:
    """The row name of a fine-tuned model: 'asac_fgsm', 'plain', 'adv_augment', 'base'."""
    return f"asac_{cfg.attack}" if cfg.mode == "asac" else cfg.mode


def finetune(model: TwoHeadModel, train_set, valid_set, cfg: Config, accelerator: Accelerator, tracker,
             generator: torch.Generator) -> TwoHeadModel:
    """Stage 3 in place on `model` (θ and ρ); returns it. φ stays frozen throughout."""
    from .evaluate import evaluate

    ft = cfg.finetune
    mode = MODES.get(ft.mode)()
    if mode.make_chunks is None:
        return model
    eps = magnitudes(ft.eps)
    # The frozen snapshot of C is taken before `prepare`, so it is a plain module on every backend.
    attacked = copy.deepcopy(model).requires_grad_(False).eval() if ft.attack_model == "frozen" else model
    set_trainable(model, "finetune")
    optimizer = adam(model.parameters(), ft.lr, cfg)
    loader = DataLoader(train_set, batch_size=ft.batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.data.num_workers)
    wrapped, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    attacked = attacked.to(accelerator.device)
    for epoch in range(ft.epochs):
        diagnostics = Diagnostics(len(eps), accelerator.device)
        ctx = StepContext(ft, eps, attacked, model, generator, diagnostics)
        start = time.perf_counter()
        bar = tqdm(loader, desc=f"finetune epoch {epoch + 1}/{ft.epochs}", leave=False,
                   disable=not accelerator.is_main_process)
        for x, y, a, _ in bar:
            chunks = mode.make_chunks(ctx, x, y, a)
            wrapped.train()
            for chunk in chunks:
                terms = chunk_loss(wrapped, x, chunk, ft.alpha)
                optimizer.zero_grad()
                accelerator.backward(terms["loss"])
                accelerator.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip)
                optimizer.step()
                for name, value in terms.items():
                    diagnostics.add(name, value.detach())
                diagnostics.add("steps", torch.tensor(1.0))
            diagnostics.add("images", torch.tensor(float(len(x))))
            bar.set_postfix(loss=f"{terms['loss'].item():.3f}")
        metrics = diagnostics.summary(accelerator, eps, time.perf_counter() - start)
        valid = evaluate(accelerator, model, valid_set, ft.batch_size, num_workers=cfg.data.num_workers).report()
        metrics.update({f"valid_{k}": v for k, v in valid.items()})
        tracker.log_metrics({f"finetune/{k}": v for k, v in metrics.items()}, step=epoch)
        if accelerator.is_main_process:
            shown = {k: metrics[k] for k in ("loss", "attack_success_rate", "valid_ACC", "valid_DEO", "images_per_s")
                     if k in metrics}
            tqdm.write(f"finetune epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    accelerator.free_memory()
    return model


def main(argv: Optional[list[str]] = None) -> None:
    from .errors import exit_on_user_error
    from .pipeline import run

    parser = argparse.ArgumentParser(
        prog="python -m distributed_asac.finetune",
        description="ASAC fine-tuning (stage 3); trains stages 1–2 first when no base_checkpoint is given.",
    )
    parser.add_argument("--config", help="experiment YAML (see configs/); defaults: the CPU demo")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. finetune.alpha=0.3")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        from .config import load_config

        run(load_config(args.config, args.overrides))


if __name__ == "__main__":
    main()
