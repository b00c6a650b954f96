"""One ASAC minibatch against plain fine-tuning and against the work it cannot avoid.

Contenders, each on its own copy of the same model, measured in interleaved rounds:

- **asac**: `Stage3.train_minibatch` in `asac` mode, as stage 3 runs it: FGSM against the frozen C, the
  difficulty-scoring forward over the k·|E| entries, the curriculum order, then |E| chunk steps.
- **plain**: the same function in `plain` mode: |E| steps on the k clean images, k·|E| entries in all.
- **bound**: the work no implementation of docs/method.md can skip, timed piece by piece in the same round:
  one forward and backward through C for the FGSM input gradient (k images), one no-grad scoring forward
  over the k·|E| entries, and |E| training steps (forward, backward, clipping, Adam) whose batches hold
  exactly the distinct images of that round's ASAC chunks: each clean image once, each perturbed entry
  once (an ε = 0 entry is its clean image).

All of them use the config's image layout (`finetune.channels_last`). Ratios are medians over rounds of
per-round ratios. A torch.profiler pass over a few ASAC minibatches then splits the step into its phases
(the `phase` labels of diagnostics.py) and lists the heaviest operators. Every contender is set up by
`stage3.build_stage3`, as stage 3 sets itself up.

The variants table runs the ASAC minibatch with one setting changed against the default and against the bound
(the default's pieces, timed in the same rounds), interleaved likewise: `channels_last` flipped; and, when asked for, `bf16_autocast`: bf16 autocast of the training
forward (what Accelerate's `mixed_precision: bf16` does to a prepared model; very slow on CPUs without bf16
units), `compiled`: `finetune.compile=true` (minutes of compilation on a CPU), and `fixed_chunks`:
`finetune.fixed_chunks=true` (every chunk forwards all k clean images and all its entries).

Before timing, a check that the step computes Eq. 5: with the model in eval mode the chunk loss must equal
the per-entry formula with separate forwards.

Usage (from the repository root)::

    python benchmarks/bench_step.py [--backbones small_cnn resnet18] [--batch-size 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass, replace
from types import MethodType
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from _common import add_common_arguments, describe, interleaved, machine, markdown_table, median, write_json
from distributed_asac.config import Config
from distributed_asac.losses import asac_loss
from distributed_asac.models import TwoHeadModel, create_model, eval_mode
from distributed_asac.rows import Chunk, Mode, StepContext
from distributed_asac.stage3 import Stage3, build_stage3, chunk_loss, forward_layouts

GOAL = 1.15  # measured / bound
# compiled: finetune.compile=true; its first calls compile (the warm-up round and, once the chunk sizes
# vary, one dynamic-shape recompile), so give it several rounds and read the median
VARIANTS = ("channels_last_flipped", "bf16_autocast", "compiled", "fixed_chunks")
PHASES = ("asac.attack", "asac.score", "asac.order", "step.forward", "step.backward", "step.clip",
          "Optimizer.zero_grad#Adam.zero_grad", "Optimizer.step#Adam.step")


@dataclass
class Batch:
    x: torch.Tensor  # [k, 3, H, W] in [0, 1]
    y: torch.Tensor  # [k]
    a: torch.Tensor  # [k]


def make_rig(base: TwoHeadModel, cfg: Config, accelerator: Accelerator, bf16: bool = False) -> Stage3:
    """One contender's own stage 3 on a copy of `base`: every contender starts from the same weights."""
    rig = build_stage3(copy.deepcopy(base), cfg, accelerator, torch.Generator().manual_seed(cfg.seed))
    if bf16:  # what Accelerate's mixed_precision="bf16" does to a prepared model (one Accelerator per process)
        wrapped = rig.wrapped
        wrapped.forward = MethodType(torch.autocast(accelerator.device.type, torch.bfloat16)(type(wrapped).forward),
                                     wrapped)
    return rig


def distinct_images(chunk: Chunk, k: int) -> int:
    """Images a chunk step must forward: its distinct clean images plus its entries that are not one."""
    layout = chunk.layout or forward_layouts([chunk], k)[0]  # set by the step (per_chunk), else made here
    return len(layout.unique) + len(layout.perturbed)


def recording(mode: Mode, store: list[Chunk]) -> Mode:
    """`mode` whose chunks are kept in `store`, so that the bound can use the same chunk sizes."""

    def make_chunks(ctx: StepContext, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> list[Chunk]:
        store[:] = mode.make_chunks(ctx, x, y, a)
        return store

    return Mode(make_chunks, mode.rows)


def bounded(name: str, rig: Stage3, base: TwoHeadModel, cfg: Config, accelerator: Accelerator,
            batch: Batch) -> tuple[dict[str, Callable[[], Any]], dict[str, Callable[[], Any]], list[int]]:
    """`rig`'s ASAC minibatch as the contender `name`, then the bound's pieces on a rig of their own, sized by the
    chunks of `name`'s last call (so `name` must run first in a round); the bookkeeping that sizes them, to run off
    the clock after each call of `name` (`interleaved`'s `after`); and those sizes, as the last call left them."""
    chunks: list[Chunk] = []
    recorded = replace(rig, mode=recording(rig.mode, chunks))
    sizes: list[int] = []

    def record_sizes() -> None:
        sizes[:] = [distinct_images(c, len(batch.x)) for c in chunks]

    contenders = {name: lambda: recorded.train_minibatch(batch.x, batch.y, batch.a),
                  **bound_pieces(make_rig(base, cfg, accelerator), accelerator, batch, cfg.grad_clip, sizes)}
    return contenders, {name: record_sizes}, sizes


def bound_seconds(times: dict[str, list[float]]) -> list[float]:
    """The bound of each round: the sum of its pieces' times."""
    pieces = [t for name, t in times.items() if name.startswith("bound_")]
    return [sum(round_) for round_ in zip(*pieces)]


def bound_pieces(rig: Stage3, accelerator: Accelerator, batch: Batch, grad_clip: float,
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


def check_loss(base: TwoHeadModel, cfg: Config, accelerator: Accelerator, batch: Batch) -> dict[str, float]:
    """Eval mode: chunk loss == Eq. 5 from separate forwards (the largest relative difference over the chunks).

    On a GPU the check runs in full float32: cuDNN's default TF32 convolutions round to 10 mantissa bits, so
    a batch of one shape and a batch of another differ by ~1e-4 relative with nothing wrong in the loss.
    """
    rig = make_rig(base, cfg, accelerator)
    chunks = rig.mode.make_chunks(rig.ctx, batch.x, batch.y, batch.a)
    alpha, worst = cfg.finetune.alpha, 0.0
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False):
        rig.model.eval()
        for chunk in chunks:
            ours = chunk_loss(rig.model, batch.x, chunk, alpha)["loss"]
            formula = asac_loss(rig.model(batch.x[chunk.clean])[0], rig.model(chunk.images)[0], chunk.labels, alpha)
            worst = max(worst, float((ours - formula["loss"]).abs() / formula["loss"].abs()))
    if worst > 1e-5:
        raise AssertionError(f"chunk loss differs from Eq. 5 in eval mode (relative {worst:.2e})")
    return {"eval_rel_diff_vs_formula": worst}


def profile_asac(rig: Stage3, batch: Batch, steps: int) -> dict[str, Any]:
    """Phase times (ms per minibatch) and the heaviest operators over `steps` ASAC minibatches."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            rig.train_minibatch(batch.x, batch.y, batch.a)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    # A label is listed twice with a GPU: as a CPU range and as a GPU annotation with no CPU time.
    phases: dict[str, float] = {}
    for e in events:
        if e.key in PHASES:
            phases[e.key] = max(phases.get(e.key, 0.0), e.cpu_time_total / 1e3 / steps)
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
    g = torch.Generator().manual_seed(1)
    k, size = args.batch_size, args.image_size
    batch = Batch(torch.rand(k, 3, size, size, generator=g).to(accelerator.device),
                  torch.randint(0, 2, (k,), generator=g).to(accelerator.device),
                  torch.randint(0, 2, (k,), generator=g).to(accelerator.device))
    checks = check_loss(base, cfg, accelerator, batch)

    plain_cfg = copy.deepcopy(cfg)
    plain_cfg.finetune.mode = "plain"
    asac, plain = (make_rig(base, c, accelerator) for c in (cfg, plain_cfg))
    timed, after, sizes = bounded("asac", asac, base, cfg, accelerator, batch)
    contenders = {"plain": lambda: plain.train_minibatch(batch.x, batch.y, batch.a), **timed}
    times = interleaved(contenders, args.repeats, after=after)
    rounds = range(args.repeats)
    bound_s = bound_seconds(times)
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
    result["profile"] = profile_asac(asac, batch, args.profile_steps)
    if args.variants:
        result["variants"] = bench_variants(base, cfg, accelerator, batch, args.variants, args.variant_repeats)
    return result


def bench_variants(base: TwoHeadModel, cfg: Config, accelerator: Accelerator, batch: Batch, names: list[str],
                   repeats: int) -> dict[str, dict[str, float]]:
    """The ASAC minibatch with one setting changed each, against the default and against the bound of the same
    rounds (the default's: eager, fp32, the config's layout), interleaved."""
    def changed(key: str, value: Any) -> Config:
        out = copy.deepcopy(cfg)
        setattr(out.finetune, key, value)
        return out

    builders: dict[str, Callable[[], Stage3]] = {
        "default": lambda: make_rig(base, cfg, accelerator),
        "channels_last_flipped": lambda: make_rig(base, changed("channels_last", not cfg.finetune.channels_last),
                                                  accelerator),
        "bf16_autocast": lambda: make_rig(base, cfg, accelerator, bf16=True),
        "compiled": lambda: make_rig(base, changed("compile", True), accelerator),
        "fixed_chunks": lambda: make_rig(base, changed("fixed_chunks", True), accelerator),
    }

    def step(rig: Stage3) -> Callable[[], Any]:
        return lambda: rig.train_minibatch(batch.x, batch.y, batch.a)

    timed, after, _ = bounded("default", builders["default"](), base, cfg, accelerator, batch)
    times = interleaved({**timed, **{name: step(builders[name]()) for name in names}}, repeats, after=after)
    bound_s = bound_seconds(times)
    return {name: {"s": median(times[name]),
                   "over_default": median([times[name][r] / times["default"][r] for r in range(repeats)]),
                   "over_bound": median([times[name][r] / bound_s[r] for r in range(repeats)])}
            for name in ["default", *names]}


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
        print(f"\n{r['backbone']}: chunk loss vs Eq. 5 in eval mode, relative {c['eval_rel_diff_vs_formula']:.1e}")
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
            print(markdown_table(["variant", "ms", "time / default", "time / bound"],
                                 [[n, 1e3 * v["s"], v["over_default"], v["over_bound"]] for n, v in r["variants"].items()]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["small_cnn", "resnet18"])
    parser.add_argument("--batch-size", type=int, default=64, help="k, images per minibatch (default: finetune's 64)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS[:1]), choices=VARIANTS,
                        help=f"each against the default (default: {VARIANTS[0]}; none given: skip)")
    parser.add_argument("--variant-repeats", type=int, default=2)
    add_common_arguments(parser, repeats=5)
    return parser


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
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
