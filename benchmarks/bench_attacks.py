"""ASACs for one batch at |E| = 3 magnitudes: this project's `fgsm` and `pgd` against torchattacks 3.5.1.

Same model (eval mode, frozen like stage 3's snapshot of C), same images in the same memory layout
(channels-last by default, as stage 3 passes them to its attacks; `--layout nchw` for the other), same ε
values, same PGD steps and step size (2.5·ε/steps). Both sides get pixel-space [0, 1] images: our models
normalise inside, so torchattacks needs no normalisation of its own.

The headline compares against torchattacks called once per NON-ZERO ε, what a user would run: the ASAC at
ε = 0 is the clean image (docs/method.md, Cost comparisons). Its call at ε = 0 is timed too and reported
in a secondary column (all |E| calls).

Before timing, the FGSM outputs are compared element by element: both compute clip₀¹(x + ε·sign(∇ₓ CE)),
so they must agree exactly (torchattacks averages the loss over the batch, we sum it; with a power-of-two
batch the two gradients differ by an exact power of two, so their signs agree bit for bit). PGD draws its
random start differently in the two libraries, so its outputs are checked for what both guarantee (inside
the ε-ball and [0, 1]) and for how often they fool C; tests/test_attacks.py checks ours against a direct
computation from the same start.

Usage (from the repository root)::

    python benchmarks/bench_attacks.py [--batch-size 32] [--image-size 64] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

import torch
from torch import nn

from _common import CLOCKS, add_common_arguments, describe, interleaved, machine, markdown_table, median, write_json
from distributed_asac.attacks import fgsm, magnitudes, pgd
from distributed_asac.models import TwoHeadModel, create_model

TORCHATTACKS_MISSING = (
    "torchattacks is not installed. It pins requests~=2.25.1, which breaks mlflow's requirements, so install it\n"
    "without its dependencies (everything else it needs is already here):\n"
    "    .venv/bin/pip install --no-deps torchattacks==3.5.1"
)
GOALS = {"fgsm": 1.9, "pgd": 1.0}  # speed-up over torchattacks at its non-zero ε (FGSM: at most 2, one gradient for two)
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}


class ProtectedHead(nn.Module):
    """C as a one-output module: torchattacks calls `model(x)` and expects logits."""

    def __init__(self, model: TwoHeadModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.protected_logits(x)


def torchattacks_per_eps(attacks: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]], x: torch.Tensor,
                         a: torch.Tensor, seconds: list[float], clock: str = "wall") -> list[torch.Tensor]:
    """One call per ε; appends each call's seconds to `seconds` (so ε = 0 can be told apart)."""
    now, out = CLOCKS[clock], []
    for attack in attacks:
        start = now()
        out.append(attack(x, a))
        seconds.append(now() - start)
    return out


def fooled(model: TwoHeadModel, adv: torch.Tensor, a: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.protected_logits(adv).argmax(1) != a).float().mean())


def check_outputs(model: TwoHeadModel, ours: dict[str, torch.Tensor], theirs: dict[str, list[torch.Tensor]],
                  x: torch.Tensor, a: torch.Tensor, eps: list[float]) -> dict[str, Any]:
    """FGSM: exact equality per ε. PGD: both inside the ε-ball and [0, 1]; fooling rates side by side."""
    checks: dict[str, Any] = {"fgsm_equal": [], "fgsm_max_abs_diff": [], "pgd_in_ball_ours": [],
                              "pgd_in_ball_torchattacks": [], "pgd_fooled_ours": [], "pgd_fooled_torchattacks": []}
    for j, e in enumerate(eps):
        checks["fgsm_equal"].append(bool(torch.equal(ours["fgsm"][j], theirs["fgsm"][j])))
        checks["fgsm_max_abs_diff"].append(float((ours["fgsm"][j] - theirs["fgsm"][j]).abs().max()))
        for name, adv in (("ours", ours["pgd"][j]), ("torchattacks", theirs["pgd"][j])):
            inside = (adv - x).abs().max() <= e + 1e-6 and adv.min() >= 0 and adv.max() <= 1
            checks[f"pgd_in_ball_{name}"].append(bool(inside))
            checks[f"pgd_fooled_{name}"].append(fooled(model, adv, a))
    return checks


def bench_backbone(backbone: str, k: int, size: int, steps: int, repeats: int, layout: str, clock: str,
                   attacks: list[str], torchattacks) -> dict[str, Any]:
    torch.manual_seed(0)
    model = create_model(backbone).eval().requires_grad_(False)  # as stage 3's frozen snapshot of C
    x = torch.rand(k, 3, size, size, generator=torch.Generator().manual_seed(1))
    x = x.contiguous(memory_format=LAYOUTS[layout])
    a = torch.randint(0, 2, (k,), generator=torch.Generator().manual_seed(2))
    eps = magnitudes([0.001, 0.01])
    # In eval mode like the model: torchattacks restores the mode it finds on `head` after every call, and a
    # head left in training mode would switch the whole model to batch statistics for every later call.
    head = ProtectedHead(model).eval()
    ta_fgsm = [torchattacks.FGSM(head, eps=e) for e in eps]
    ta_pgd = [torchattacks.PGD(head, eps=e, alpha=2.5 * e / steps, steps=steps, random_start=True) for e in eps]

    ours = {"fgsm": fgsm(model.protected_logits, x, a, eps), "pgd": pgd(model.protected_logits, x, a, eps, steps=steps)}
    theirs = {"fgsm": torchattacks_per_eps(ta_fgsm, x, a, []), "pgd": torchattacks_per_eps(ta_pgd, x, a, [])}
    checks = check_outputs(model, ours, theirs, x, a, eps)
    if not all(checks["fgsm_equal"]):
        raise AssertionError(f"{backbone}: fgsm and torchattacks.FGSM differ (max |Δ| {checks['fgsm_max_abs_diff']}): "
                             "the benchmark would compare different work")

    per_call: dict[str, list[float]] = {"fgsm": [], "pgd": []}
    contenders = {
        "fgsm": lambda: fgsm(model.protected_logits, x, a, eps),
        "torchattacks_fgsm": lambda: torchattacks_per_eps(ta_fgsm, x, a, per_call["fgsm"], clock),
        "pgd": lambda: pgd(model.protected_logits, x, a, eps, steps=steps),
        "torchattacks_pgd": lambda: torchattacks_per_eps(ta_pgd, x, a, per_call["pgd"], clock),
    }
    timed = {name: fn for name, fn in contenders.items() if name.removeprefix("torchattacks_") in attacks}
    times = interleaved(timed, repeats, clock=clock)
    result: dict[str, Any] = {"backbone": backbone, "batch_size": k, "image_size": size, "eps": eps,
                              "layout": layout, "clock": clock, "pgd_steps": steps, "checks": checks,
                              "seconds": times, "attacks": {}}
    n = len(eps)
    for attack in attacks:
        calls = per_call[attack][-repeats * n:]  # the timed rounds, without the warm-up's calls
        nonzero = [sum(calls[r * n + j] for j in range(n) if eps[j] > 0) for r in range(repeats)]
        ours, theirs = times[attack], times[f"torchattacks_{attack}"]
        speedup = median([t / o for t, o in zip(nonzero, ours)])  # per round: load shifts between rounds
        result["attacks"][attack] = {
            "ours_s": median(ours), "torchattacks_nonzero_eps_s": median(nonzero), "torchattacks_all_eps_s": median(theirs),
            "speedup": speedup, "speedup_vs_all_eps": median([t / o for t, o in zip(theirs, ours)]),
            "goal": GOALS[attack], "goal_met": speedup >= GOALS[attack],
        }
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["small_cnn", "resnet18"])
    parser.add_argument("--batch-size", type=int, default=32, help="k (a power of two keeps FGSM comparable bit for bit)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--attacks", nargs="+", choices=sorted(GOALS), default=sorted(GOALS), help="attacks timed")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="channels_last",
                        help="memory layout of the images for both libraries (default: stage 3's channels_last)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall (default) or cpu: CPU time of this process, steadier on a loaded machine at 1 thread")
    add_common_arguments(parser, repeats=3)
    args = parser.parse_args(argv)
    try:
        import torchattacks
    except ImportError:
        raise SystemExit(TORCHATTACKS_MISSING) from None
    if args.smoke:
        args.batch_size, args.image_size, args.pgd_steps, args.repeats = 4, 16, 2, 1
    torch.set_num_threads(args.threads)
    info = machine()
    results = [bench_backbone(b, args.batch_size, args.image_size, args.pgd_steps, args.repeats, args.layout,
                              args.clock, args.attacks, torchattacks) for b in args.backbones]

    rows = []
    n_nonzero = sum(e > 0 for e in results[0]["eps"])
    for r in results:
        for attack, m in r["attacks"].items():
            rows.append([r["backbone"], attack, 1e3 * m["ours_s"], 1e3 * m["torchattacks_nonzero_eps_s"], m["speedup"],
                         f"≥ {m['goal']:g}: {'met' if m['goal_met'] else 'NOT met'}", 1e3 * m["torchattacks_all_eps_s"],
                         m["speedup_vs_all_eps"]])
    print(f"machine: {describe(info)}")
    print(f"k = {args.batch_size}, {args.image_size}×{args.image_size} {args.layout}, E = {results[0]['eps']}, "
          f"PGD {args.pgd_steps} steps; {args.clock} clock, medians of {args.repeats} interleaved rounds\n")
    print(markdown_table(["backbone", "attack", "ours ms", f"torchattacks ms ({n_nonzero} non-zero ε)", "speed-up",
                          "goal", f"torchattacks ms (all {len(results[0]['eps'])} ε)", "speed-up vs all ε"], rows))
    print("\nFGSM outputs equal to torchattacks' for every ε: "
          + ", ".join(f"{r['backbone']} {all(r['checks']['fgsm_equal'])}" for r in results))
    for r in results:
        c = r["checks"]
        print(f"PGD {r['backbone']}: inside ε-ball and [0, 1] ours {all(c['pgd_in_ball_ours'])}, torchattacks "
              f"{all(c['pgd_in_ball_torchattacks'])}; C fooled per ε ours {c['pgd_fooled_ours']}, "
              f"torchattacks {c['pgd_fooled_torchattacks']}")
    payload = {"benchmark": "attacks", "machine": info, "args": {k: str(v) for k, v in vars(args).items()},
               "results": results}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
