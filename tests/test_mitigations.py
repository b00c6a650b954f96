"""The rows beside ASAC (distributed_asac/mitigations/): each update rule on a toy case with a known answer, the
same number of optimizer steps as plain fine-tuning through stage 3's own loader, and the values they refuse.
(Bad values through the CLI: tests/test_bad_input.py; the bound sweep's trial count: tests/test_claims.py.)"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader

from distributed_asac.config import load_config
from distributed_asac.data import synthetic as syn
from distributed_asac.data.batches import to_pixels, uint8_images
from distributed_asac.data.celeba import CelebA
from distributed_asac.errors import UserError
from distributed_asac.mitigations.dfr import balanced_draw, c_grid, halves, l1_logistic, set_target_head
from distributed_asac.mitigations.group_dro import GroupWeights, group_dro
from distributed_asac.mitigations.groups import GroupBalancedBatches, dataset_groups, group_ids
from distributed_asac.mitigations.jtt import UpweightedDraws, collapse_warning, error_draw_share, upweighted
from distributed_asac.models import create_model
from distributed_asac.stage3 import build_stage3, finetune


# GroupDRO (Sagawa et al. 2020, Algorithm 1): q_g ← q_g·exp(η·L_g), normalised, once per minibatch; loss Σ_g q_g·L_g
# with the new q.

def test_group_dro_weights_follow_a_hand_computed_loss_sequence():
    weights = GroupWeights(math.log(2.0), torch.full((4,), 0.25))  # η = ln 2: exp(η·L) = 2^L
    groups = torch.tensor([0, 1, 1, 2, 3, 3])
    terms = weights.step(torch.tensor([0.0, 0.5, 1.5, 2.0, 2.0, 4.0]), groups)  # group means L = 0, 1, 2, 3
    assert torch.allclose(weights.q, torch.tensor([1.0, 2.0, 4.0, 8.0]) / 15)  # ¼·2^L, normalised
    assert terms["loss"].item() == pytest.approx((0 * 1 + 1 * 2 + 2 * 4 + 3 * 8) / 15)  # 34/15, with the new q
    assert terms["loss_ce"].item() == pytest.approx(10.0 / 6) and terms["loss_worst_group"].item() == 3.0
    weights.new_minibatch()
    weights.step(torch.tensor([3.0, 2.0, 1.0, 0.0]), torch.arange(4))  # ×[8, 4, 2, 1]: back to uniform
    assert torch.allclose(weights.q, torch.full((4,), 0.25))
    weights.new_minibatch()
    weights.step(torch.tensor([1.0]), torch.tensor([2]))  # absent groups have L = 0: q ∝ [1, 1, 2, 1]
    assert torch.allclose(weights.q, torch.tensor([1.0, 1.0, 2.0, 1.0]) / 5)


def test_group_dro_updates_q_once_per_minibatch_of_e_chunks():
    """The |E| steps on one minibatch train on its same images: the first updates q from its group losses, the later
    ones descend with that q and leave it (an update per step made η |E| times the paper's, per distinct minibatch)."""
    weights = GroupWeights(1.0, torch.full((4,), 0.25))
    ctx = SimpleNamespace(magnitudes=[0.0, 0.001, 0.01], prepared=weights)  # |E| = 3
    y, a = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 0, 1, 1])  # groups 0, 1, 2, 3, 3

    def group_losses(logits: torch.Tensor) -> torch.Tensor:  # [4] L_g, the mean cross-entropy of group g
        ce = F.cross_entropy(logits, y, reduction="none")
        return torch.stack([ce[0], ce[1], ce[2], ce[3:].mean()])

    # the model moves between steps: each step's logits [5, 2] differ
    logits = [torch.randn(5, 2, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    updates = 0
    for minibatch in range(2):
        chunks = group_dro(ctx, torch.zeros(5, 3, 8, 8), y, a)
        assert len(chunks) == 3
        for chunk, step_logits in zip(chunks, logits[minibatch:]):
            before = weights.q.clone()
            terms = chunk.loss(step_logits, y)
            updates += not torch.equal(weights.q, before)
            assert terms["loss"].item() == pytest.approx(float((weights.q * group_losses(step_logits)).sum()))
        if minibatch == 0:  # by hand: ¼·exp(η·L_g) of the first step's losses, normalised (η = 1)
            assert updates == 1 and torch.allclose(weights.q, torch.softmax(group_losses(logits[0]), 0))
    assert updates == 2  # one per minibatch


def test_group_dro_loss_is_the_weighted_group_mean_of_cross_entropy():
    """Through the chunk's loss hook: its gradient is that of Σ_g q_g·mean CE over group g, q the updated weights."""
    weights = GroupWeights(0.01, torch.full((4,), 0.25))
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -0.5], [0.0, 3.0]], requires_grad=True)
    y, a = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 1, 0, 0])  # groups 0, 1, 3, 2, 2
    terms = weights.loss(logits, y, group_ids(y, a))
    ce = torch.nn.functional.cross_entropy(logits.detach(), y, reduction="none")
    group_loss = torch.stack([ce[0], ce[1], ce[3:].mean(), ce[2]])
    q = torch.full((4,), 0.25) * torch.exp(0.01 * group_loss)
    assert torch.allclose(weights.q, q / q.sum())
    assert terms["loss"].item() == pytest.approx(float((weights.q * group_loss).sum()))
    terms["loss"].backward()
    assert logits.grad.abs().sum() > 0
    assert load_config().group_dro.eta == 0.01  # the paper's code's default step size


# Group-balanced minibatches (resample, group_dro)

@pytest.mark.parametrize("k", [8, 10])
def test_every_resampled_minibatch_is_group_balanced(k):
    groups = torch.tensor([0] * 50 + [1] * 5 + [2] * 7 + [3] * 38)
    sampler = GroupBalancedBatches(groups, k, seed=3)
    order = list(sampler)
    assert len(order) == len(sampler) == (100 // k) * k  # the minibatches of a shuffled epoch with drop_last
    for b in range(100 // k):
        counts = torch.bincount(groups[order[b * k:(b + 1) * k]], minlength=4)
        assert counts.sum() == k and counts.min() == k // 4 and counts.max() == k // 4 + (k % 4 > 0)
    small = [i for i in order if groups[i] == 1][:2 * math.ceil(5 / (k // 4))]  # the minibatches that use group 1 up
    assert set(small) == {50, 51, 52, 53, 54}  # every image of a group before any repeats
    sampler.set_epoch(0)
    assert list(sampler) == order  # a function of (seed, epoch): a resumed epoch draws the same
    assert list(sampler) != order  # the next epoch draws anew


# JTT (Liu et al. 2021): the identification model's mistakes on train, drawn λ times as often

def test_jtt_draws_the_error_set_lambda_times_as_often():
    errors = torch.zeros(10000, dtype=torch.bool)
    errors[:1000] = True
    cfg = load_config(None, ["jtt.upweight=9"])
    sampler = upweighted(cfg, None, errors)
    assert sampler.weights[:1000].eq(9).all() and sampler.weights[1000:].eq(1).all()
    draws = torch.tensor(list(sampler))
    assert len(draws) == 10000  # one epoch draws len(train) images: the same minibatches as plain
    assert (draws < 1000).float().mean().item() == pytest.approx(9000 / 18000, abs=0.02)  # λ·|E| / (λ·|E| + rest)
    assert list(UpweightedDraws(torch.ones(5), 0)) == list(UpweightedDraws(torch.ones(5), 0))


def test_jtt_warns_when_the_error_set_fills_the_draws():
    """λe / (λe + 1 − e) of the draws are mistakes: 50·0.2 / (10 + 0.8) = 92.6% as in the bound study's mild regime
    (where M collapsed), 50·0.05 / (2.5 + 0.95) = 72.5% at a 5% error share; the warning starts above 85%."""
    assert error_draw_share(0.2, 50) == pytest.approx(10 / 10.8)
    assert error_draw_share(0.05, 50) == pytest.approx(2.5 / 3.45)
    assert error_draw_share(0.2, 1) == pytest.approx(0.2)  # λ = 1: plain's draws
    assert collapse_warning(0.05, 50) is None
    warning = collapse_warning(0.2, 50)
    # λ = 2(1 − e)/e = 8 brings the share to 8·0.2 / (1.6 + 0.8) = 2/3
    assert warning.startswith("jtt: the identification model gets 20.0% of train wrong, so 93% of the draws at "
                              "jtt.upweight=50 ")
    assert warning.endswith("jtt.upweight=8 brings them to 2/3") and error_draw_share(0.2, 8) == pytest.approx(2 / 3)
    assert collapse_warning(0.1, 50) is None and collapse_warning(0.1, 52) is not None  # 5/5.9 = 84.7%, 5.2/6.1 = 85.2%


# DFR (Kirichenko et al. 2023)

def test_dfr_balanced_subset_is_exactly_balanced_and_halves_hold_every_group():
    groups = torch.tensor([0] * 50 + [1] * 5 + [2] * 7 + [3] * 38)
    generator = torch.Generator().manual_seed(0)
    draws = [balanced_draw(groups, generator) for _ in range(2)]
    for draw in draws:
        assert torch.bincount(groups[draw], minlength=4).tolist() == [5, 5, 5, 5] and len(set(draw.tolist())) == 20
        assert set(range(50, 55)) <= set(draw.tolist())  # the smallest group whole
    assert not torch.equal(draws[0], draws[1])  # fresh draws of the larger groups
    first, second = halves(groups, generator)
    assert sorted(first.tolist() + second.tolist()) == list(range(100))
    assert torch.bincount(groups[first], minlength=4).tolist() == [25, 3, 4, 19]
    assert torch.bincount(groups[second], minlength=4).tolist() == [25, 2, 3, 19]


def test_l1_logistic_regression_is_liblinears():
    """The DFR code's solver: scikit-learn's liblinear, ‖w‖₁ + C·Σ log(1 + exp(−s·w·[x, 1])) (intercept penalised)."""
    linear_model = pytest.importorskip("sklearn.linear_model")  # scikit-learn comes with fairlearn (.[dev])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(120, 16, generator=generator, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.5 * torch.randn(120, generator=generator, dtype=torch.float64) > 0).long()
    for c in (1.0, 0.1):
        w = l1_logistic(x, y, c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-learn 1.8 deprecates penalty=, the DFR code's spelling
            reference = linear_model.LogisticRegression(penalty="l1", C=c, solver="liblinear", tol=1e-12,
                                                        max_iter=100000).fit(x.numpy(), y.numpy())
        expected = torch.tensor([*reference.coef_[0], *reference.intercept_], dtype=torch.float64)
        assert torch.allclose(w, expected, atol=1e-5), (c, (w - expected).abs().max())
        assert ((w == 0) == (expected == 0)).all()  # the same features left out
    # Known answer: w = 0 is optimal when C·|Σ sᵢ·[xᵢ, 1]|/2 ≤ 1 in every coordinate (the ℓ1 subgradient at 0).
    assert l1_logistic(x, y, 0.01).eq(0).all()


def test_the_folded_head_computes_the_logistic_regression():
    model = create_model("small_cnn").eval()
    generator = torch.Generator().manual_seed(1)
    d = model.target_head.in_features
    w = torch.randn(d + 1, generator=generator, dtype=torch.float64)
    mean, std = torch.randn(d, generator=generator, dtype=torch.float64), torch.rand(d, generator=generator, dtype=torch.float64) + 0.5
    set_target_head(model, w, mean, std)
    x = torch.rand(6, 3, 32, 32, generator=generator)
    with torch.no_grad():
        features = model.backbone((x - model.mean) / model.std).double()
        logits = model(x)[0].double()
    expected = ((features - mean) / std) @ w[:-1] + w[-1]
    assert torch.allclose(logits[:, 1] - logits[:, 0], expected, atol=1e-4)


# Through stage 3, on a generated dataset

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """240 generated faces at 32 px, bias 0.8: train 168 images, valid groups [9, 2, 3, 10]."""
    root = tmp_path_factory.mktemp("mitigations") / "data"
    syn.generate(root, 240, 0.8, 3, (32, 32), workers=1)
    return root


def _config(root, *overrides):
    return load_config(None, [f"data.root={root}", "data.image_size=32", "data.synthetic_num_images=240",
                              "data.synthetic_bias=0.8", "data.synthetic_seed=3", "finetune.batch_size=24", *overrides])


class _Tracker:
    def __init__(self):
        self.logged = {}

    def log_metrics(self, metrics, step=None):
        self.logged.update(metrics)


@contextmanager
def _records(name: str) -> Iterator[list[logging.LogRecord]]:
    """The records logged to `name` inside the block (the package's loggers do not propagate to pytest's caplog)."""
    handler = logging.Handler()
    records: list[logging.LogRecord] = []
    handler.emit = records.append
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_each_row_takes_as_many_steps_as_plain_on_the_same_minibatches(dataset):
    """One epoch of stage 3's own loader: |E| optimizer steps on each of len(train) // k minibatches, as plain
    fine-tuning takes; resample's and group_dro's minibatches hold k/4 images of every group; jtt warns when its
    identification model's mistakes fill the draws (its error set: `test_jtt_error_set_is_the_mistakes_of_...`)."""
    train = CelebA(dataset, "train", "Smiling", "Male", 32)
    steps = {}
    for row in ("plain", "resample", "group_dro", "jtt"):
        cfg = _config(dataset, f"finetune.mode={row}")
        torch.manual_seed(0)
        model = create_model("small_cnn")
        with _records("distributed_asac.mitigations.jtt") as logged:
            stage = build_stage3(model, cfg, Accelerator(cpu=True), torch.Generator().manual_seed(0), train_set=train)
        if row == "jtt":  # an M after 2 steps of stage 1 errs often: nearly every draw at λ = 50 is a mistake
            share = stage.summary["jtt_error_share"]
            assert 0 < stage.ctx.prepared.sum() < len(train) and share == stage.ctx.prepared.float().mean().item()
            assert [r.getMessage() for r in logged] == [collapse_warning(share, 50.0)]
        else:
            assert logged == []
        for x, y, a, _ in stage.loader:
            if row in ("resample", "group_dro"):
                assert torch.bincount(group_ids(y, a), minlength=4).tolist() == [6, 6, 6, 6]
            stage.train_minibatch(x, y, a)
        steps[row] = stage.ctx.diagnostics.counts["steps"]
        if row == "group_dro":
            assert stage.ctx.prepared.q.sum().item() == pytest.approx(1.0) and not torch.allclose(
                stage.ctx.prepared.q, torch.full((4,), 0.25))  # the weights moved with the group losses
    assert steps == dict.fromkeys(steps, (168 // 24) * 3)  # 7 minibatches × |E| = 3


def test_group_dro_q_after_a_minibatch_of_stage_3(dataset):
    """Through stage 3's own loader and steps: after the |E| = 3 optimizer steps of one minibatch, q is one update
    from the group losses of the model as the minibatch found it, by hand (q_g ∝ exp(η·L_g), η = 1)."""
    cfg = _config(dataset, "finetune.mode=group_dro", "group_dro.eta=1")
    train = CelebA(dataset, "train", "Smiling", "Male", 32)
    torch.manual_seed(0)
    stage = build_stage3(create_model("small_cnn"), cfg, Accelerator(cpu=True), torch.Generator().manual_seed(0),
                         train_set=train)
    x, y, a, _ = next(iter(stage.loader))
    with torch.no_grad():  # a copy in train mode, as the first step sees the model (batch statistics of the k images)
        ce = F.cross_entropy(copy.deepcopy(stage.model).train()(to_pixels(x))[0], y, reduction="none")
    groups = group_ids(y, a)
    group_loss = torch.stack([ce[groups == g].mean() for g in range(4)])  # every group holds k/4 = 6 images
    weights, seen = stage.ctx.prepared, []
    step = weights.step

    def counted(*args):  # every step: q as it descends with
        terms = step(*args)
        seen.append(weights.q.clone())
        return terms

    weights.step = counted
    stage.train_minibatch(x, y, a)
    assert len(seen) == 3 and all(torch.equal(q, seen[0]) for q in seen)  # 3 steps, q from the first alone
    assert torch.allclose(seen[0], torch.softmax(group_loss, 0), atol=1e-6), (seen[0], torch.softmax(group_loss, 0))


def test_a_resumed_group_dro_stage_goes_on_with_the_q_it_left(dataset, tmp_path, monkeypatch):
    """q is part of every epoch's saved state: stage 3 stopped after its first epoch and resumed from its state ends
    with the weights of the uninterrupted stage, bit for bit (every step's loss is q-weighted; a resumed stage
    used to restart q uniform, and ended elsewhere)."""
    from distributed_asac import loop

    cfg = _config(dataset, "finetune.mode=group_dro", "finetune.epochs=2")
    train, valid = (CelebA(dataset, split, "Smiling", "Male", 32) for split in ("train", "valid"))

    def stage_3(state_dir):
        torch.manual_seed(0)
        model = create_model("small_cnn")
        return finetune(model, train, valid, cfg, Accelerator(cpu=True), _Tracker(), torch.Generator().manual_seed(0),
                        state_dir)[0].state_dict()

    whole = stage_3(tmp_path / "whole")

    class Stopped(Exception):
        pass

    def stop_after_epoch_1(name, **context):
        if name == "stage.epoch_end" and context == {"stage": "finetune", "epoch": 1}:
            raise Stopped  # as a kill there would: the state of epoch 1 is saved, epoch 2 not begun

    with monkeypatch.context() as patch:
        patch.setattr(loop, "failpoint", stop_after_epoch_1)
        with pytest.raises(Stopped):
            stage_3(tmp_path / "resumed")
    (saved,) = (tmp_path / "resumed").iterdir()
    assert saved.name == "epoch_0001"
    resumed = stage_3(tmp_path / "resumed")
    assert whole.keys() == resumed.keys()
    for name, tensor in whole.items():
        assert torch.equal(tensor, resumed[name]), name


def test_jtt_error_set_is_the_mistakes_of_erm_after_t_epochs_and_retrain_starts_over(dataset):
    """JTT's identification model is stage 1 stopped after T = jtt.identification_epochs epochs: computed here by hand
    (the seed's initialisation, the next draw of the global stream as the shuffle, Adam at base.lr, clipping at 1),
    its train mistakes are the error set, image by image, and not the base's. `retrain` (the default) then starts M
    (θ, ρ) from that initialisation, C's head φ the base's; `finetune` keeps the base. The random state after stage
    3's setup is the one before it. (Per-rank batch norm: torch's module, which the hand loop uses.)"""
    train = CelebA(dataset, "train", "Smiling", "Male", 32)
    overrides = ["finetune.mode=jtt", "jtt.identification_epochs=2", "base.batch_size=12", "seed=3", "sync_batchnorm=false"]
    cfg = _config(dataset, *overrides)
    torch.manual_seed(cfg.seed)  # stage 1's initialisation: the config's seed
    reference = create_model("small_cnn")
    start = copy.deepcopy(reference.state_dict())
    order = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))  # stage 1's shuffle
    trained = [p for name, p in reference.named_parameters() if not name.startswith("protected_head.")]  # θ, ρ
    optimizer = torch.optim.Adam(trained, lr=cfg.base.lr)
    reference.train()
    for _ in range(2):
        for x, y, *_ in DataLoader(uint8_images(train), batch_size=12, shuffle=True, drop_last=True, generator=order):
            loss = F.cross_entropy(reference(to_pixels(x))[0], y)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
    reference.eval()
    with torch.no_grad():
        expected = [int(reference(train[i][0][None])[0].argmax()) != int(train.targets[i]) for i in range(len(train))]
    assert 0 < sum(expected) < 0.4 * len(train)  # not a constant M's mistakes (a whole class, about half of train)

    for final in ("retrain", "finetune"):
        torch.manual_seed(7)
        base = create_model("small_cnn")  # another draw than the seed's: a base M to tell apart from the start
        before = copy.deepcopy(base.state_dict())
        with torch.no_grad():
            base_wrong = [int(base.eval()(train[i][0][None])[0].argmax()) != int(train.targets[i]) for i in range(len(train))]
        state = torch.get_rng_state()
        stage = build_stage3(base, _config(dataset, *overrides, f"jtt.final={final}"), Accelerator(cpu=True),
                             torch.Generator().manual_seed(0), train_set=train)
        assert torch.equal(torch.get_rng_state(), state)  # stage 3 draws what every row of the seed draws
        assert stage.ctx.prepared.tolist() == expected != base_wrong
        assert stage.summary["jtt_error_set_size"] == sum(expected)
        for name, tensor in stage.model.state_dict().items():
            kept = before if final == "finetune" or name.startswith("protected_head.") else start
            assert torch.equal(tensor, kept[name]), (final, name)


def test_dfr_refits_the_target_head_only_on_valid(dataset):
    """DFR takes no minibatch step: the backbone and C are bit for bit the base's, only ρ changes, and its C is
    chosen from the grid on valid's halves."""
    cfg = _config(dataset, "finetune.mode=dfr", "dfr.retrains=3", "dfr.c_grid=[1.0,0.1]")
    train, valid = (CelebA(dataset, split, "Smiling", "Male", 32) for split in ("train", "valid"))
    torch.manual_seed(0)
    model = create_model("small_cnn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tracker = _Tracker()
    model, summary = finetune(model, train, valid, cfg, Accelerator(cpu=True), tracker, torch.Generator())
    after = model.state_dict()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]) != name.startswith("target_head."), name
    assert summary["dfr_C"] in (1.0, 0.1) and summary["dfr_images_per_group"] == 2  # valid's smallest group
    assert tracker.logged["finetune/dfr_C"] == summary["dfr_C"]
    assert torch.equal(after["target_head.weight"][0], torch.zeros_like(after["target_head.weight"][0]))


def test_dfr_tries_the_published_grid_of_the_dataset(dataset):
    """dfr.c_grid null (the default): the DFR code's CelebA grid for data.name celeba, its WaterBirds grid for every
    other dataset; a grid the user sets wins. Through the row: every C of CelebA's grid is tried, and no other."""
    celeba, waterbirds = [3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003], [1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01]
    assert load_config().dfr.c_grid is None
    assert c_grid(load_config(None, ["data.name=celeba"])) == celeba
    assert c_grid(load_config()) == c_grid(load_config(None, ["data.name=lfw"])) == waterbirds
    assert c_grid(load_config(None, ["data.name=celeba", "dfr.c_grid=[0.5,2]"])) == [0.5, 2.0]
    cfg = _config(dataset, "finetune.mode=dfr", "dfr.retrains=1", "data.name=celeba")  # the generated files, read as CelebA
    train, valid = (CelebA(dataset, split, "Smiling", "Male", 32) for split in ("train", "valid"))
    torch.manual_seed(0)
    tracker = _Tracker()
    finetune(create_model("small_cnn"), train, valid, cfg, Accelerator(cpu=True), tracker, torch.Generator())
    tried = sorted(float(k.rpartition("_C_")[2]) for k in tracker.logged if k.startswith("finetune/dfr_tune_worst_group_ACC_C_"))
    assert tried == sorted(celeba)


@pytest.mark.parametrize("override, message", [
    ("group_dro.eta=0", r"'group_dro\.eta': must be > 0, got 0\.0"),
    ("group_dro.eta=-0.01", r"'group_dro\.eta': must be > 0, got -0\.01"),
    ("jtt.upweight=0.5", r"'jtt\.upweight': must be >= 1, got 0\.5"),
    ("dfr.c_grid=[]", r"'dfr\.c_grid': need at least one C > 0"),
    ("dfr.c_grid=[1.0,0]", r"'dfr\.c_grid': need at least one C > 0"),
    ("dfr.retrains=0", r"'dfr\.retrains': 0 is out of range"),
    ("jtt.identification_epochs=0", r"'jtt\.identification_epochs': 0 is out of range \(must be >= 1\)"),
    ("jtt.final=scratch", r"'jtt\.final': unknown value 'scratch'.*valid: retrain, finetune"),
])
def test_bad_values_are_refused_by_the_config(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


def test_a_split_that_cannot_be_balanced_is_refused(dataset):
    from distributed_asac.mitigations.groups import check_groups
    from distributed_asac.rows import MODES

    valid = CelebA(dataset, "valid", "Smiling", "Male", 32)
    assert torch.bincount(dataset_groups(valid), minlength=4).tolist() == [9, 2, 3, 10]
    with pytest.raises(UserError, match=r"needs at least 4 image\(s\) in every .*\(y=0, a=1\) 2, \(y=1, a=0\) 3"):
        check_groups(dataset_groups(valid), 4, "finetune.mode=dfr (the valid split)")
    splits = type("Splits", (), {"train": valid, "valid": valid})
    MODES.get("dfr").check_splits(_config(dataset), splits)  # 2 per group: enough
    MODES.get("resample").check_splits(_config(dataset), splits)
