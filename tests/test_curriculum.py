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

    def forward(self, x):
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
