"""What stage 3 reports about its steps: per-epoch sums reduced across ranks, and the phase labels of a step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

# Names the phases of a step in torch.profiler traces (benchmarks/bench_step.py); about a microsecond each
# when no profiler runs. The optimizer labels its own step.
phase = torch.profiler.record_function


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

    def running_mean(self, name: str) -> float:
        """This rank's mean of `name` over the steps so far (a host read of the device sum)."""
        return float(self.sums[name]) / self.counts["steps"]

    def count(self, name: str, value: float) -> None:
        """A number the host already knows (steps, images, entries): kept on the host, so that counting
        costs no host-to-device copy per step; `summary` sends all counts in one tensor."""
        self.counts[name] = self.counts.get(name, 0.0) + value

    def record_asacs(self, scores: torch.Tensor, target_logits: torch.Tensor, k: int) -> None:
        """scores [|E|·k] and target logits [|E|·k, 2] of the current M on the ASACs of k images; E[0] = 0 is clean.
        (Attack success is C's business, measured on a fixed sample by `stage3.measure_attack`.)"""
        self.add("ds_sum", scores.view(self.n_eps, k).sum(1))  # [|E|]
        self.count("ds_count", float(k))  # the same for every ε
        predicted = target_logits.argmax(1).view(self.n_eps, k)
        self.add("m_flipped", (predicted[1:] != predicted[0]).sum())
        self.count("asac_count", float((self.n_eps - 1) * k))

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
            out["asac_flips_M_rate"] = float(totals["m_flipped"]) / max(float(totals["asac_count"]), 1.0)
        out["images_per_s"] = images / max(seconds, 1e-9)
        out["optimizer_steps"] = steps / accelerator.num_processes  # every rank takes each step
        return out
