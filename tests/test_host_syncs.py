"""Stage 3's minibatch makes the host wait for the device only where the numbers need it: once per ASAC minibatch
(the chunks' batch sizes, one copy), never for plain fine-tuning; and the device-side chunk layout is exactly the
host-side torch.unique / nonzero composition it replaced.

On CPU nothing waits, so the test counts the calls that would make a GPU's host wait: the aten ops whose result
the host must see (a scalar, or a shape that depends on the data) and the Python methods that copy to the host.
A host-to-device copy cannot be seen on CPU; on a GPU `torch.cuda.set_sync_debug_mode("error")` around the step
catches it (docs/performance.md).
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any, Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distributed_asac.rows import Chunk

aten = torch.ops.aten

# aten ops whose output the host must read: a scalar (item, bool, int, float) or a data-dependent shape.
HOST_READ_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten._unique2.default,
                 aten.unique_dim.default, aten.unique_consecutive.default, aten.masked_select.default,
                 aten.repeat_interleave.Tensor, aten.bincount.default}
HOST_COPY_METHODS = ("tolist", "cpu", "numpy")  # no aten op on a CPU tensor, so they are caught as methods


class HostReads(TorchDispatchMode):
    """Records each host read of a tensor; `exempt` holds the data pointers of tensors that live on the host on
    every device (Adam's step counters), whose reads cost no wait."""

    def __init__(self, exempt: set[int]) -> None:
        super().__init__()
        self.exempt, self.reads = exempt, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READ_OPS and args[0].data_ptr() not in self.exempt:
            self.reads.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def host_reads(monkeypatch, run: Callable[[], Any], exempt: frozenset[int] = frozenset()) -> list[str]:
    """The host reads of `run()`, but for those of the tensors whose data pointers are in `exempt`."""
    mode = HostReads(exempt)
    for name in HOST_COPY_METHODS:
        method = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *args, _m=method, _n=name, **kw: (mode.reads.append(_n), _m(self, *args, **kw))[1])
    with mode:
        run()
    monkeypatch.undo()
    return mode.reads


def minibatch_reads(monkeypatch, stage, batch: list[torch.Tensor]) -> list[str]:
    """The host reads of one `stage.train_minibatch(*batch)`; Adam's step counters live on the host on every
    device (not capturable), so reading them is no wait."""
    steps = frozenset(state["step"].data_ptr() for state in stage.optimizer.state.values())
    return host_reads(monkeypatch, lambda: stage.train_minibatch(*batch), steps)


# (row, its settings, the host reads of one minibatch)
MINIBATCHES = [
    ("plain", {}, []),
    ("adv_augment", {"pgd_steps": 2}, []),
    ("asac_fgsm", {}, ["tolist"]),
    ("asac_fgsm", {"order": "random"}, ["tolist"]),
    ("asac_fgsm", {"steps": "per_minibatch"}, ["tolist"]),
    ("asac_pgd", {"pgd_steps": 2}, ["tolist"]),
    ("asac_fgsm", {"fixed_chunks": True}, []),
    ("asac_fgsm", {"fixed_chunks": True, "steps": "per_minibatch"}, []),
]


def trained_stage(row: str, settings: dict, cpu: bool):
    """A stage 3 of `row` on small_cnn after one minibatch (which makes Adam's state, its host-side step
    counters), with a minibatch (x [8, 3, 16, 16], y [8], a [8]) on its device."""
    from accelerate import Accelerator

    from distributed_asac.config import Config
    from distributed_asac.models import create_model
    from distributed_asac.rows import fine_tuned_rows
    from distributed_asac.stage3 import build_stage3

    torch.manual_seed(0)
    cfg = Config()
    cfg.finetune = replace(cfg.finetune, **fine_tuned_rows()[row], **settings)
    accelerator = Accelerator(cpu=cpu)
    stage = build_stage3(create_model("small_cnn"), cfg, accelerator, torch.Generator().manual_seed(0))
    batch = [t.to(accelerator.device) for t in (torch.rand(8, 3, 16, 16), torch.arange(8) % 2, (torch.arange(8) // 2) % 2)]
    stage.train_minibatch(*batch)
    return stage, batch


@pytest.mark.parametrize("row, settings, expected", MINIBATCHES)
def test_a_minibatch_reads_the_device_only_for_the_chunk_sizes(monkeypatch, row, settings, expected):
    """An ASAC minibatch reads the device once (the [|E|, 2] batch sizes of its chunks), with fixed-shape chunks
    never, a plain one never; the old step read it once per minibatch for the order and twice per chunk
    (torch.unique, nonzero)."""
    stage, batch = trained_stage(row, settings, cpu=True)
    assert minibatch_reads(monkeypatch, stage, batch) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU; the test above counts the same calls on CPU")
@pytest.mark.parametrize("row, settings, expected", MINIBATCHES)
def test_on_a_gpu_a_minibatch_synchronizes_only_for_the_chunk_sizes(row, settings, expected):
    """What the CPU test counts, as CUDA sees it: host-to-device copies from pageable memory included."""
    stage, batch = trained_stage(row, settings, cpu=False)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            stage.train_minibatch(*batch)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert len([w for w in caught if "synchronizing" in str(w.message)]) == len(expected)


def test_the_interceptor_sees_the_reads_of_the_old_step(monkeypatch):
    """The check above can fail: the composition the old step did on the host (torch.unique, nonzero, .cpu())
    is seen."""

    def old_composition():
        rows = torch.rand(4).argsort().cpu()
        torch.unique(rows % 2, return_inverse=True)
        (rows < 2).nonzero()

    assert host_reads(monkeypatch, old_composition) == ["cpu", "_unique2", "nonzero"]


def test_a_group_dro_step_reads_nothing(monkeypatch):
    """GroupDRO's q update counts each group's images without torch.bincount (whose output size is read)."""
    from distributed_asac.mitigations.group_dro import GroupWeights

    weights = GroupWeights(0.01, torch.full((4,), 0.25))
    logits, labels, groups = torch.randn(8, 2), torch.arange(8) % 2, torch.tensor([0, 1, 1, 3, 3, 3, 0, 1])
    assert host_reads(monkeypatch, lambda: weights.loss(logits, labels, groups)) == []


@pytest.mark.parametrize("with_is_clean", [True, False])
def test_forward_layouts_match_the_host_composition(with_is_clean):
    """Each chunk's layout holds exactly what torch.unique and nonzero give on the host: the distinct clean images
    ascending, the perturbed entries ascending, and each entry's rows of the [u + m] forward batch."""
    from distributed_asac.stage3 import forward_layouts

    g = torch.Generator().manual_seed(0)
    k, n_eps = 8, 4
    steps = torch.randperm(k * n_eps, generator=g).view(n_eps, k)  # [|E|, k] a curriculum order
    chunks = [Chunk(torch.empty(k, 1), torch.empty(k), clean=rows % k, is_clean=rows < k if with_is_clean else None)
              for rows in steps]
    for chunk, layout in zip(chunks, forward_layouts(chunks, k)):
        unique, inverse = torch.unique(chunk.clean, return_inverse=True)
        is_clean = chunk.is_clean if with_is_clean else torch.zeros(k, dtype=torch.bool)
        perturbed = (~is_clean).nonzero().squeeze(1)
        own_rows = inverse.clone()
        own_rows[perturbed] = len(unique) + torch.arange(len(perturbed))
        assert torch.equal(layout.unique, unique) and torch.equal(layout.perturbed, perturbed)
        assert torch.equal(layout.clean_rows, inverse) and torch.equal(layout.asac_rows, own_rows)
