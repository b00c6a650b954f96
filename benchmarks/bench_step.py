"""One ASAC minibatch against plain fine-tuning and against the work it cannot avoid.

Contenders, each on its own copy of the same model, measured in interleaved rounds:

- **asac**: `finetune.train_minibatch` in `asac` mode, as stage 3 runs it: FGSM against the frozen C, the
  difficulty-scoring forward over the k·|E| entries, the curriculum order, then |E| chunk steps.
- **plain**: the same function in `plain` mode: |E| steps on the k clean images, k·|E| entries in all.
- **bound**: the work no implementation of docs/method.md can skip, timed piece by piece in the same round:
  one forward and backward through C for the FGSM input gradient (k images), one no-grad scoring forward
  over the k·|E| entries, and |E| training steps (forward, backward, clipping, Adam) whose batches hold
  exactly the distinct images of that round's ASAC chunks: each clean image once, each perturbed entry
  once (an ε = 0 entry is its clean image).

All of them use the config's image layout (`finetune.channels_last`). Ratios are medians over rounds of
per-round ratios. A torch.profiler pass over a few ASAC minibatches then splits the step into its phases
(the `phase` labels of finetune.py) and lists the heaviest operators.

The variants table runs the ASAC minibatch with changes against the default, interleaved likewise:
`channels_last` flipped; `eps0_forwarded_again`, as before ε = 0 entries shared their clean image's forward;
`previous_step`, both (NCHW images and ε = 0 entries forwarded again: the CPU work of the step before this
benchmark's changes); and, when asked for, `bf16_autocast`: bf16 autocast of the training forward (what
Accelerate's `mixed_precision: bf16` does to a prepared model; very slow on CPUs without bf16 units).

Before timing, a check that the step computes Eq. 5: with the model in eval mode the chunk loss must equal
the per-entry formula with separate forwards. (In train mode batch norm normalises over the forwarded
batch, so it also reports how far the loss moves from the earlier implementation that forwarded an ε = 0
entry a second time beside its clean image.)

Usage (from the repository root)::

    python benchmarks/bench_step.py [--backbones small_cnn resnet18] [--batch-size 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from types import MethodType
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from _common import add_common_arguments, describe, interleaved, machine, markdown_table, median, write_json
from distributed_asac.attacks import magnitudes
from distributed_asac.config import Config
from distributed_asac.finetune import (MODES, Chunk, Diagnostics, Mode, StepContext, chunk_loss, eval_mode,
                                       train_minibatch)
from distributed_asac.losses import asac_loss
from distributed_asac.models import TwoHeadModel, create_model, set_trainable
from distributed_asac.runtime import adam

GOAL = 1.15  # measured / bound
VARIANTS = ("channels_last_flipped", "eps0_forwarded_again", "previous_step", "bf16_autocast")
PHASES = ("asac.attack", "asac.score", "asac.order", "step.forward", "step.backward", "step.clip",
          "Optimizer.zero_grad#Adam.zero_grad", "Optimizer.step#Adam.step")


@dataclass
class Batch:
    x: torch.Tensor  # [k, 3, H, W] in [0, 1]
    y: torch.Tensor  # [k]
    a: torch.Tensor  # [k]


@dataclass
class Rig:
    """One contender's own model, optimizer and step context, all from the same initial weights."""

    model: TwoHeadModel
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    ctx: StepContext


def make_rig(base: TwoHeadModel, attacked: TwoHeadModel, cfg: Config, accelerator: Accelerator,
             bf16: bool = False) -> Rig:
    model = copy.deepcopy(base)
    set_trainable(model, "finetune")
    optimizer = adam(model.parameters(), cfg.finetune.lr, cfg)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    if bf16:  # what Accelerate's mixed_precision="bf16" does to a prepared model (one Accelerator per process)
        wrapped.forward = MethodType(torch.autocast(accelerator.device.type, torch.bfloat16)(type(wrapped).forward),
                                     wrapped)
    eps = magnitudes(cfg.finetune.eps)
    ctx = StepContext(cfg.finetune, eps, attacked, model, torch.Generator().manual_seed(cfg.seed),
                      Diagnostics(len(eps), accelerator.device))
    return Rig(model, wrapped, optimizer, ctx)


def distinct_images(chunk: Chunk) -> int:
    """Images a chunk step must forward: its distinct clean images plus its entries that are not one."""
    perturbed = len(chunk.images) if chunk.is_clean is None else int((~chunk.is_clean).sum())
    return len(torch.unique(chunk.clean)) + perturbed


def recording(mode: Mode, store: list[Chunk]) -> Mode:
    """`mode` whose chunks are kept in `store`, so that the bound can use the same chunk sizes."""

    def make_chunks(ctx: StepContext, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> list[Chunk]:
        store[:] = mode.make_chunks(ctx, x, y, a)
        return store

    return Mode(make_chunks)


def bound_pieces(rig: Rig, accelerator: Accelerator, batch: Batch, grad_clip: float,
                 sizes: list[int]) -> dict[str, Callable[[], Any]]:
    """The unavoidable work, one callable per piece; `sizes` (filled by the caller) are the chunk batches."""
    n_eps, k = len(rig.ctx.magnitudes), len(batch.x)
    layout = torch.channels_last if rig.ctx.cfg.channels_last else torch.contiguous_format
    images = batch.x.contiguous(memory_format=layout)
    entries = torch.cat([images] * n_eps)  # [|E|·k, 3, H, W]
    pool = torch.rand(2 * k, *batch.x.shape[1:], generator=torch.Generator().manual_seed(3))
    pool = pool.to(batch.x.device).contiguous(memory_format=layout)
    pool_labels = torch.randint(0, 2, (2 * k,), generator=torch.Generator().manual_seed(4)).to(batch.y.device)

    def fgsm_gradient() -> None:
        x = images.detach().requires_grad_(True)
        with eval_mode(rig.ctx.attacked):
            torch.autograd.grad(F.cross_entropy(rig.ctx.attacked(x)[1], batch.a, reduction="sum"), x)

    def scoring() -> None:
        with torch.no_grad(), eval_mode(rig.model):
            rig.model(entries)

    def chunk_steps() -> None:
        rig.wrapped.train()
        for n in sizes:
            loss = F.cross_entropy(rig.wrapped(pool[:n])[0], pool_labels[:n])
            rig.optimizer.zero_grad()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(rig.wrapped.parameters(), grad_clip)
            rig.optimizer.step()

    return {"bound_fgsm_gradient": fgsm_gradient, "bound_scoring": scoring, "bound_chunk_steps": chunk_steps}


def check_loss(base: TwoHeadModel, attacked: TwoHeadModel, cfg: Config, accelerator: Accelerator,
               batch: Batch) -> dict[str, float]:
    """Eval mode: chunk loss == Eq. 5 from separate forwards. Train mode: the largest relative change of the
    loss against forwarding ε = 0 entries again (batch-norm statistics see those images once, not twice)."""
    rig = make_rig(base, attacked, cfg, accelerator)
    chunks = MODES.get("asac")().make_chunks(rig.ctx, batch.x, batch.y, batch.a)
    alpha, worst_eval, worst_train = cfg.finetune.alpha, 0.0, 0.0
    with torch.no_grad():
        for chunk in chunks:
            rig.model.eval()
            ours = chunk_loss(rig.model, batch.x, chunk, alpha)["loss"]
            formula = asac_loss(rig.model(batch.x[chunk.clean])[0], rig.model(chunk.images)[0], chunk.labels, alpha)
            worst_eval = max(worst_eval, float((ours - formula["loss"]).abs() / formula["loss"].abs()))
            rig.model.train()
            ours = chunk_loss(rig.model, batch.x, chunk, alpha)["loss"]
            again = chunk_loss(rig.model, batch.x, Chunk(chunk.images, chunk.labels, chunk.clean), alpha)["loss"]
            worst_train = max(worst_train, float((ours - again).abs() / again.abs()))
    if worst_eval > 1e-5:
        raise AssertionError(f"chunk loss differs from Eq. 5 in eval mode (relative {worst_eval:.2e})")
    return {"eval_rel_diff_vs_formula": worst_eval, "train_rel_diff_vs_forwarding_eps0_again": worst_train}


def profile_asac(rig: Rig, accelerator: Accelerator, batch: Batch, grad_clip: float, steps: int) -> dict[str, Any]:
    """Phase times (ms per minibatch) and the heaviest operators over `steps` ASAC minibatches."""
    mode = MODES.get("asac")()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            train_minibatch(mode, rig.ctx, rig.wrapped, rig.optimizer, accelerator, batch.x, batch.y, batch.a, grad_clip)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    by_name = {e.key: e for e in events}
    phases = {name: by_name[name].cpu_time_total / 1e3 / steps for name in PHASES if name in by_name}
    phases["other (Python, diagnostics)"] = max(wall * 1e3 / steps - sum(phases.values()), 0.0)
    total_self = sum(e.self_cpu_time_total for e in events)
    operators = [
        {"op": e.key, "calls_per_minibatch": e.count / steps, "self_ms_per_minibatch": e.self_cpu_time_total / 1e3 / steps,
         "self_percent": 100.0 * e.self_cpu_time_total / total_self}
        for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
        if not e.key.startswith(("asac.", "step.", "Optimizer."))
    ][:15]
    return {"ms_per_minibatch_profiled": wall * 1e3 / steps, "phases_ms": phases, "operators": operators}


def bench_backbone(backbone: str, args: argparse.Namespace, accelerator: Accelerator) -> dict[str, Any]:
    cfg = Config()
    cfg.finetune.batch_size = args.batch_size
    torch.manual_seed(0)
    base = create_model(backbone).to(accelerator.device)
    attacked = copy.deepcopy(base).requires_grad_(False).eval()  # stage 3's frozen snapshot of C
    g = torch.Generator().manual_seed(1)
    k, size = args.batch_size, args.image_size
    batch = Batch(torch.rand(k, 3, size, size, generator=g).to(accelerator.device),
                  torch.randint(0, 2, (k,), generator=g).to(accelerator.device),
                  torch.randint(0, 2, (k,), generator=g).to(accelerator.device))
    checks = check_loss(base, attacked, cfg, accelerator, batch)

    asac, plain, bound = (make_rig(base, attacked, cfg, accelerator) for _ in range(3))
    chunks: list[Chunk] = []
    asac_mode, plain_mode = recording(MODES.get("asac")(), chunks), MODES.get("plain")()
    sizes: list[int] = []

    def asac_step() -> None:
        train_minibatch(asac_mode, asac.ctx, asac.wrapped, asac.optimizer, accelerator, batch.x, batch.y, batch.a,
                        cfg.grad_clip)
        sizes[:] = [distinct_images(c) for c in chunks]  # after the step: its chunks fix this round's bound

    contenders: dict[str, Callable[[], Any]] = {
        "asac": asac_step,
        "plain": lambda: train_minibatch(plain_mode, plain.ctx, plain.wrapped, plain.optimizer, accelerator,
                                         batch.x, batch.y, batch.a, cfg.grad_clip),
        **bound_pieces(bound, accelerator, batch, cfg.grad_clip, sizes),
    }
    times = interleaved(contenders, args.repeats)
    rounds = range(args.repeats)
    bound_s = [sum(times[p][r] for p in contenders if p.startswith("bound_")) for r in rounds]
    result: dict[str, Any] = {
        "backbone": backbone, "batch_size": k, "image_size": size, "eps": asac.ctx.magnitudes, "checks": checks,
        "channels_last": cfg.finetune.channels_last,
        "seconds": times, "bound_s": bound_s, "last_chunk_sizes": list(sizes),
        "asac_s": median(times["asac"]), "plain_s": median(times["plain"]), "bound_median_s": median(bound_s),
        "asac_over_plain": median([times["asac"][r] / times["plain"][r] for r in rounds]),
        "asac_over_bound": median([times["asac"][r] / bound_s[r] for r in rounds]),
        "bound_pieces_s": {p: median(times[p]) for p in contenders if p.startswith("bound_")},
    }
    result["goal_met"] = result["asac_over_bound"] <= GOAL
    result["profile"] = profile_asac(asac, accelerator, batch, cfg.grad_clip, args.profile_steps)
    if args.variants:
        result["variants"] = bench_variants(base, attacked, cfg, accelerator, batch, args.variants, args.variant_repeats)
    return result


def without_eps0_sharing(mode: Mode) -> Mode:
    """`mode` as before ε = 0 entries shared their clean image's forward: those entries are forwarded again."""

    def make_chunks(ctx: StepContext, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> list[Chunk]:
        return [Chunk(c.images, c.labels, c.clean) for c in mode.make_chunks(ctx, x, y, a)]

    return Mode(make_chunks)


def bench_variants(base: TwoHeadModel, attacked: TwoHeadModel, cfg: Config, accelerator: Accelerator, batch: Batch,
                   names: list[str], repeats: int) -> dict[str, dict[str, float]]:
    """The ASAC minibatch with one change each, against the default, interleaved."""
    mode = MODES.get("asac")()
    flipped, nchw = copy.deepcopy(cfg), copy.deepcopy(cfg)
    flipped.finetune.channels_last, nchw.finetune.channels_last = not cfg.finetune.channels_last, False
    builders: dict[str, Callable[[], tuple[Rig, Mode]]] = {
        "default": lambda: (make_rig(base, attacked, cfg, accelerator), mode),
        "channels_last_flipped": lambda: (make_rig(base, attacked, flipped, accelerator), mode),
        "eps0_forwarded_again": lambda: (make_rig(base, attacked, cfg, accelerator), without_eps0_sharing(mode)),
        "previous_step": lambda: (make_rig(base, attacked, nchw, accelerator), without_eps0_sharing(mode)),
        "bf16_autocast": lambda: (make_rig(base, attacked, cfg, accelerator, bf16=True), mode),
    }

    def step(rig: Rig, mode: Mode) -> Callable[[], Any]:
        return lambda: train_minibatch(mode, rig.ctx, rig.wrapped, rig.optimizer, accelerator, batch.x, batch.y,
                                       batch.a, cfg.grad_clip)

    times = interleaved({name: step(*builders[name]()) for name in ["default", *names]}, repeats)
    return {name: {"s": median(t), "over_default": median([t[r] / times["default"][r] for r in range(repeats)])}
            for name, t in times.items()}


def report(results: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, Any]) -> None:
    print(f"machine: {describe(info)}")
    print(f"k = {args.batch_size}, {args.image_size}×{args.image_size}, E = {results[0]['eps']}, FGSM, ascending; "
          f"medians of {args.repeats} interleaved rounds\n")
    rows = [[r["backbone"], 1e3 * r["asac_s"], 1e3 * r["plain_s"], 1e3 * r["bound_median_s"],
             " + ".join(f"{1e3 * v:.0f}" for v in r["bound_pieces_s"].values()), r["asac_over_plain"],
             r["asac_over_bound"], f"≤ {GOAL}: {'met' if r['goal_met'] else 'NOT met'}"] for r in results]
    print(markdown_table(["backbone", "asac ms", "plain ms", "bound ms", "bound = grad + score + chunks",
                          "asac / plain", "asac / bound", "goal"], rows))
    for r in results:
        c = r["checks"]
        print(f"\n{r['backbone']}: chunk loss vs Eq. 5 in eval mode, relative {c['eval_rel_diff_vs_formula']:.1e}; "
              f"train mode vs forwarding ε = 0 entries again, relative {c['train_rel_diff_vs_forwarding_eps0_again']:.1e}")
        p = r["profile"]
        print(f"profile ({args.profile_steps} minibatches, {p['ms_per_minibatch_profiled']:.0f} ms each under the profiler):")
        print(markdown_table(["phase", "ms / minibatch"], [[k, v] for k, v in p["phases_ms"].items()]))
        print()
        print(markdown_table(["operator", "calls / minibatch", "self ms / minibatch", "self %"],
                             [[o["op"], o["calls_per_minibatch"], o["self_ms_per_minibatch"], o["self_percent"]]
                              for o in p["operators"]]))
        if "variants" in r:
            print(f"\n{r['backbone']} variants (ASAC minibatch, {args.variant_repeats} interleaved rounds; default "
                  f"channels_last={results[0]['channels_last']}):")
            print(markdown_table(["variant", "ms", "time / default"],
                                 [[n, 1e3 * v["s"], v["over_default"]] for n, v in r["variants"].items()]))


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["small_cnn", "resnet18"])
    parser.add_argument("--batch-size", type=int, default=64, help="k, images per minibatch (default: finetune's 64)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS[:3]), choices=VARIANTS,
                        help=f"each against the default (default: {' '.join(VARIANTS[:3])}; none given: skip)")
    parser.add_argument("--variant-repeats", type=int, default=2)
    add_common_arguments(parser, repeats=5)
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_size, args.image_size, args.repeats, args.profile_steps, args.variant_repeats = 4, 16, 1, 1, 1
    torch.set_num_threads(args.threads)
    accelerator = Accelerator()
    info = machine()
    results = [bench_backbone(b, args, accelerator) for b in args.backbones]
    report(results, args, info)
    payload = {"benchmark": "step", "machine": info, "args": {k: str(v) for k, v in vars(args).items()},
               "results": results}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
