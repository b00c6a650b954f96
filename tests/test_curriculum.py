"""Difficulty scores, chunk orders, stable ties, |E| steps per minibatch, and the loss of Eq. 5."""

import pytest
import torch
import torch.nn.functional as F

from distributed_asac.curriculum import ORDERS, curriculum_chunks, difficulty_scores
from distributed_asac.losses import asac_loss
from distributed_asac.rows import Chunk
from distributed_asac.stage3 import chunk_loss


def test_difficulty_score_is_one_minus_true_class_probability():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    y = torch.tensor([0, 0, 1])
    p = logits.softmax(1)
    expected = torch.tensor([1 - p[0, 0], 1 - p[1, 0], 0.5])
    torch.testing.assert_close(difficulty_scores(logits, y), expected)


def test_orders_and_stable_ties():
    g = torch.Generator().manual_seed(0)
    # k = 3 images, |E| = 2: entries 0..5; entries 1, 3 and 4 tie.
    scores = torch.tensor([0.9, 0.2, 0.5, 0.2, 0.2, 0.1])
    asc = curriculum_chunks(scores, "ascending", 2, g)
    assert asc.tolist() == [[5, 1, 3], [4, 2, 0]]  # ties 1 < 3 < 4 keep entry order
    desc = curriculum_chunks(scores, "descending", 2, g)
    assert desc.tolist() == [[0, 2, 1], [3, 4, 5]]
    rnd = curriculum_chunks(scores, "random", 2, g)
    assert rnd.shape == (2, 3) and sorted(rnd.flatten().tolist()) == list(range(6))
    assert set(ORDERS.names()) == {"ascending", "descending", "random"}


@pytest.mark.parametrize("order", ORDERS.names())
def test_every_order_gives_E_steps_of_k_entries(order):
    g = torch.Generator().manual_seed(0)
    k, n_eps = 8, 4
    scores = torch.rand(k * n_eps, generator=g)
    chunks = curriculum_chunks(scores, order, n_eps, g)
    assert chunks.shape == (n_eps, k)
    assert sorted(chunks.flatten().tolist()) == list(range(k * n_eps))  # each entry exactly once
    if order == "ascending":
        flat = scores[chunks.flatten()]
        assert torch.all(flat[1:] >= flat[:-1])


def test_asac_loss_equals_formula():
    g = torch.Generator().manual_seed(0)
    clean, adv = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    y = torch.tensor([0, 1, 1, 0, 1])
    terms = asac_loss(clean, adv, y, alpha=0.3)
    manual = [0.3 * -clean.log_softmax(1)[i, y[i]] + 0.7 * -adv.log_softmax(1)[i, y[i]] for i in range(5)]
    torch.testing.assert_close(terms["loss"], torch.stack(manual).mean())
    torch.testing.assert_close(terms["loss_clean"], F.cross_entropy(clean, y))
    torch.testing.assert_close(terms["loss_asac"], F.cross_entropy(adv, y))


def test_alpha_one_ignores_the_asacs():
    adv = torch.randn(4, 2, requires_grad=True)
    clean = torch.randn(4, 2, requires_grad=True)
    asac_loss(clean, adv, torch.tensor([0, 1, 0, 1]), alpha=1.0)["loss"].backward()
    assert torch.all(adv.grad == 0) and clean.grad.abs().sum() > 0


class _Recorder(torch.nn.Module):
    """Returns fixed logits per input image (keyed by its first pixel) and records batch sizes."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x, protected=True):
        self.batches.append(x.shape[0])
        v = x[:, 0, 0, 0]
        return torch.stack([v, -v], 1), torch.zeros(x.shape[0], 2)


def test_chunk_loss_forwards_each_clean_image_once_and_matches_per_entry_loss():
    x = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 2, 2).contiguous()  # k = 3 clean images
    asacs = x[[0, 0, 2]] + 0.5  # entries: image 0 twice, image 2 once
    chunk = Chunk(images=asacs, labels=torch.tensor([1, 1, 0]), clean=torch.tensor([0, 0, 2]))
    model = _Recorder()
    terms = chunk_loss(model, x, chunk, alpha=0.4)
    assert model.batches == [2 + 3]  # one forward: clean images {0, 2} + 3 entries
    logits = lambda t: torch.stack([t[:, 0, 0, 0], -t[:, 0, 0, 0]], 1)
    expected = asac_loss(logits(x[[0, 0, 2]]), logits(asacs), chunk.labels, 0.4)
    for name in expected:
        torch.testing.assert_close(terms[name], expected[name])


@pytest.mark.parametrize("row, steps, expected", [("asac_fgsm", "per_chunk", 3), ("asac_fgsm", "per_minibatch", 1),
                                                  ("plain", "per_chunk", 3), ("plain", "per_minibatch", 1)])
def test_optimizer_steps_per_minibatch(row, steps, expected):
    """finetune.steps: |E| = 3 steps per minibatch by default, one with per_minibatch, for ASAC and plain alike."""
    from dataclasses import replace

    from accelerate import Accelerator

    from distributed_asac.config import Config
    from distributed_asac.models import create_model
    from distributed_asac.rows import fine_tuned_rows
    from distributed_asac.stage3 import build_stage3

    torch.manual_seed(0)
    cfg = Config()
    cfg.finetune = replace(cfg.finetune, **fine_tuned_rows()[row], steps=steps)
    stage = build_stage3(create_model("small_cnn"), cfg, Accelerator(cpu=True), torch.Generator().manual_seed(0))
    calls = []
    step = stage.optimizer.step
    stage.optimizer.step = lambda *args, **kwargs: (calls.append(1), step(*args, **kwargs))[1]
    x, y, a = torch.rand(8, 3, 16, 16), torch.arange(8) % 2, (torch.arange(8) // 2) % 2
    stage.train_minibatch(x, y, a)
    assert len(calls) == expected == stage.ctx.diagnostics.counts["steps"]


def test_one_step_is_eq_5_averaged_over_every_entry():
    """per_minibatch joins the |E| ordered chunks into one: the loss is the mean of Eq. 5 over all k·|E| entries,
    each clean image forwarded once; a repeated chunk (plain) is taken once."""
    from distributed_asac.stage3 import one_step

    x = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 2, 2).contiguous()  # k = 3
    entries = torch.cat([x, x + 0.25, x + 0.5])  # |E| = 3, entry j·k + i is image i at E[j]
    labels = torch.tensor([1, 0, 1]).repeat(3)
    order = torch.tensor([4, 0, 8, 2, 6, 1, 3, 7, 5]).view(3, 3)  # some curriculum order
    chunks = [Chunk(entries[r], labels[r], clean=r % 3, is_clean=r < 3) for r in order]
    model = _Recorder()
    terms = chunk_loss(model, x, one_step(chunks), alpha=0.3)
    assert model.batches == [3 + 6]  # the 3 clean images once, the 6 perturbed entries
    logits = lambda t: torch.stack([t[:, 0, 0, 0], -t[:, 0, 0, 0]], 1)
    expected = asac_loss(logits(x.repeat(3, 1, 1, 1)), logits(entries), labels, 0.3)
    for name in expected:
        torch.testing.assert_close(terms[name], expected[name])
    plain = [Chunk(x, labels[:3])] * 3
    assert one_step(plain) is plain[0]


def test_a_fixed_shape_chunk_forwards_all_images_and_computes_eq_5():
    """finetune.fixed_chunks: the forward holds all k clean images and all n entries whatever the order (k + n
    rows), and the loss is Eq. 5 over the chunk's entries, an ε = 0 entry reading its clean image's logits."""
    from distributed_asac.stage3 import fixed_layout

    x = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 2, 2).contiguous()  # k = 3
    entries = torch.cat([x, x + 0.25, x + 0.5])  # |E| = 3, entry j·k + i is image i at E[j]
    labels = torch.tensor([1, 0, 1]).repeat(3)
    rows = torch.tensor([4, 0, 3])  # image 1 at E[1], image 0 at E[0] (clean), image 0 at E[1]: image 2 absent
    chunk = Chunk(entries[rows], labels[rows], clean=rows % 3, is_clean=rows < 3)
    chunk.layout = fixed_layout(chunk, 3)
    model = _Recorder()
    terms = chunk_loss(model, x, chunk, alpha=0.3)
    assert model.batches == [3 + 3]
    assert chunk.layout.asac_rows.tolist() == [3, 0, 5]  # entry j at row k + j, but the ε = 0 entry reads clean row 0
    logits = lambda t: torch.stack([t[:, 0, 0, 0], -t[:, 0, 0, 0]], 1)
    expected = asac_loss(logits(x[chunk.clean]), logits(chunk.images), chunk.labels, 0.3)
    for name in expected:
        torch.testing.assert_close(terms[name], expected[name])
