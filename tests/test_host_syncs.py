"""Stage 3's minibatch makes the host wait for the device only where the numbers need it: once per ASAC minibatch
(the chunks' batch sizes, one copy), never for plain fine-tuning; and the device-side chunk layout is exactly the
host-side torch.unique / nonzero composition it replaced.

On CPU nothing waits, so the test counts the calls that would make a GPU's host wait (`host_syncs.host_reads`).
A host-to-device copy cannot be seen on CPU; on a GPU CUDA's sync debug mode around the step catches it
(`host_syncs.cuda_syncs`; benchmarks/sync_counts.py reports both counts for every row).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from distributed_asac.host_syncs import cuda_syncs, host_reads, optimizer_step_counters
from distributed_asac.rows import Chunk


def minibatch_reads(stage, batch: list[torch.Tensor]) -> list[str]:
    """The host reads of one `stage.train_minibatch(*batch)` (Adam's step counters are no wait)."""
    return host_reads(lambda: stage.train_minibatch(*batch), optimizer_step_counters(stage.optimizer))


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
def test_a_minibatch_reads_the_device_only_for_the_chunk_sizes(row, settings, expected):
    """An ASAC minibatch reads the device once (the [|E|, 2] batch sizes of its chunks), with fixed-shape chunks
    never, a plain one never; the old step read it once per minibatch for the order and twice per chunk
    (torch.unique, nonzero)."""
    stage, batch = trained_stage(row, settings, cpu=True)
    assert minibatch_reads(stage, batch) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU; the test above counts the same calls on CPU")
@pytest.mark.parametrize("row, settings, expected", MINIBATCHES)
def test_on_a_gpu_a_minibatch_synchronizes_only_for_the_chunk_sizes(row, settings, expected):
    """What the CPU test counts, as CUDA sees it: host-to-device copies from pageable memory included."""
    stage, batch = trained_stage(row, settings, cpu=False)
    assert len(cuda_syncs(lambda: stage.train_minibatch(*batch))) == len(expected)


def test_the_interceptor_sees_the_reads_of_the_old_step():
    """The check above can fail: the composition the old step did on the host (torch.unique, nonzero, .cpu())
    is seen."""

    original_cpu = torch.Tensor.cpu

    def old_composition():
        rows = torch.rand(4).argsort().cpu()
        torch.unique(rows % 2, return_inverse=True)
        (rows < 2).nonzero()

    assert host_reads(old_composition) == ["cpu", "_unique2", "nonzero"]
    assert torch.Tensor.cpu is original_cpu  # the methods are restored after the count


def test_a_group_dro_step_reads_nothing():
    """GroupDRO's q update counts each group's images without torch.bincount (whose output size is read)."""
    from distributed_asac.mitigations.group_dro import GroupWeights

    weights = GroupWeights(0.01, torch.full((4,), 0.25))
    logits, labels, groups = torch.randn(8, 2), torch.arange(8) % 2, torch.tensor([0, 1, 1, 3, 3, 3, 0, 1])
    assert host_reads(lambda: weights.loss(logits, labels, groups)) == []


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
