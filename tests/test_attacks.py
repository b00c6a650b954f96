"""FGSM and PGD against direct computations; every attack's contract; making a minibatch's chunks (attacks and
scoring included) leaves the models untouched, in every fine-tuning mode."""

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from distributed_asac.attacks import ATTACKS, _input_gradient, _LeanInputGradients, create_attack, fgsm, magnitudes, pgd
from distributed_asac.config import ATTACK_MODELS, Config, FinetuneConfig
from distributed_asac.models import create_model
from distributed_asac.rows import MODES, fine_tuned_rows
from distributed_asac.stage3 import build_stage3


def _model(seed=0):
    torch.manual_seed(seed)
    return create_model("small_cnn").eval()


def _batch(k=6, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(k, 3, size, size, generator=g), torch.randint(0, 2, (k,), generator=g)


def test_magnitudes_always_include_zero():
    assert magnitudes([0.01, 0.001]) == [0.0, 0.001, 0.01]
    assert magnitudes([0.0, 0.01, 0.01]) == [0.0, 0.01]


def test_fgsm_equals_direct_computation():
    model = _model()
    x, a = _batch()
    eps = [0.0, 0.003, 0.1]
    adv = fgsm(model.protected_logits, x, a, eps)
    assert adv.shape == (3, *x.shape)
    xg = x.clone().requires_grad_(True)
    F.cross_entropy(model.protected_logits(xg), a).backward()  # mean reduction: same sign
    for j, e in enumerate(eps):
        expected = (x + e * xg.grad.sign()).clamp(0, 1)
        torch.testing.assert_close(adv[j], expected, rtol=0, atol=1e-7)
    assert torch.equal(adv[0], x)  # ε = 0 is the clean image


def test_fgsm_shared_gradient_equals_one_attack_per_eps():
    model = _model()
    x, a = _batch()
    eps = [0.0, 0.001, 0.01, 0.05]
    together = fgsm(model.protected_logits, x, a, eps)
    for j, e in enumerate(eps):
        torch.testing.assert_close(together[j], fgsm(model.protected_logits, x, a, [e])[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_attack_stays_in_ball_and_box_and_is_the_clean_image_at_zero(name):
    model = _model()
    x, a = _batch()
    x[0] = 0.0  # pixels at the box edges exercise the [0, 1] projection
    x[1] = 1.0
    eps = [0.0, 0.01, 0.2]
    adv = create_attack(name, FinetuneConfig(pgd_steps=5))(model.protected_logits, x, a, eps)
    assert adv.shape == (3, *x.shape)
    assert torch.equal(adv[0], x)
    for j, e in enumerate(eps):
        assert (adv[j] - x).abs().max() <= e + 1e-6
        assert adv[j].min() >= 0 and adv[j].max() <= 1
    assert (adv[2] - x).abs().max() > 0.1  # it moved


def test_each_attack_gets_only_its_own_settings():
    settings = FinetuneConfig(pgd_steps=3)
    assert create_attack("fgsm", settings) is fgsm
    bound = create_attack("pgd", settings)
    assert (bound.func, bound.keywords) == (pgd, {"steps": 3})


def _model_with_statistics(backbone="small_cnn"):
    """A model in eval mode whose batch norms have non-trivial statistics and affine parameters (the
    initial 0, 1, 1, 0 would make the multiplications of the backward exact whatever their order)."""
    model = _model() if backbone == "small_cnn" else create_model(backbone)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                for tensor, low, high in ((module.running_mean, -0.5, 0.5), (module.running_var, 0.2, 3.0),
                                          (module.weight, 0.3, 2.0), (module.bias, -0.5, 0.5)):
                    tensor.copy_(torch.empty_like(tensor).uniform_(low, high, generator=g))
    return model.eval().requires_grad_(False)


def _stock_gradient(model, x, a):
    """∇ₓ Σ CE(C(x), a) by plain autograd, outside any attack."""
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model.protected_logits(x), a, reduction="sum"), x)
    return g


def _direct_pgd(model, x, a, e, steps, noise):
    """docs/method.md's PGD at one ε, written out: start x + U[−ε, ε], then `steps` times: a signed step of
    2.5·ε/steps, projection onto the ε-ball, then onto [0, 1]."""
    adv = (x + (noise * 2 - 1) * e).clamp(0, 1)
    for _ in range(steps):
        adv = adv + 2.5 * e / steps * _stock_gradient(model, adv, a).sign()
        adv = torch.min(torch.max(adv, x - e), x + e).clamp(0, 1)
    return adv


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_pgd_equals_a_direct_computation_from_the_same_start(layout):
    model = _model_with_statistics()
    x, a = _batch()
    x = x.contiguous(memory_format=layout)
    x[0] = 0.0  # pixels at the box edges exercise the [0, 1] projection
    x[1] = 1.0
    eps, steps = [0.0, 0.02, 0.3], 3
    adv = pgd(model.protected_logits, x, a, eps, steps=steps, generator=torch.Generator().manual_seed(7))
    # The contract: one uniform draw [|E|, k, 3, H, W] from the generator, row j for eps[j] (zeros included).
    noise = torch.rand((len(eps), *x.shape), generator=torch.Generator().manual_seed(7))
    assert torch.equal(adv[0], x)  # ε = 0 is the clean image
    for j in (1, 2):
        assert torch.equal(adv[j], _direct_pgd(model, x, a, eps[j], steps, noise[j])), eps[j]
    assert (adv[2] - x).abs().max() > 0.1  # it moved


@pytest.mark.parametrize("backbone", ["small_cnn", "resnet18"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_attack_gradients_equal_plain_autograd_bit_for_bit(backbone, layout):
    """The attacks' cheaper batch-norm backward and reordered weights change no bit of the gradient."""
    model = _model_with_statistics(backbone)
    x, a = _batch(k=4, size=32)
    x = x.contiguous(memory_format=layout)
    with _LeanInputGradients():
        twice = [_input_gradient(model.protected_logits, x, a) for _ in range(2)]  # the second reuses the reorders
    expected = _stock_gradient(model, x, a)
    assert all(torch.equal(g, expected) for g in twice)
    adv = fgsm(model.protected_logits, x, a, [0.0, 0.01])
    assert torch.equal(adv[1], (x + 0.01 * expected.sign()).clamp(0, 1))


def _trained_probe():
    """A small CNN whose protected head learned a pixel cue (red vs blue), plus held-out data."""
    torch.manual_seed(0)
    model = create_model("small_cnn")
    g = torch.Generator().manual_seed(0)

    def data(n):
        a = torch.randint(0, 2, (n,), generator=g)
        x = torch.rand(n, 3, 16, 16, generator=g) * 0.6
        x[:, 0] += 0.1 * a.view(-1, 1, 1)
        x[:, 2] += 0.1 * (1 - a).view(-1, 1, 1)
        return x, a

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        x, a = data(64)
        loss = F.cross_entropy(model.protected_logits(x), a)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), data(256)


def test_pgd_fools_a_trained_probe_more_than_fgsm():
    model, (x, a) = _trained_probe()
    clean_acc = (model.protected_logits(x).argmax(1) == a).float().mean()
    assert clean_acc > 0.9
    e = 0.05  # large enough that both attacks fool some images, small enough that neither fools all
    fooled = {}
    for name in ("fgsm", "pgd"):
        adv = create_attack(name, FinetuneConfig(pgd_steps=10))(model.protected_logits, x, a, [e])[0]
        with torch.no_grad():
            fooled[name] = (model.protected_logits(adv).argmax(1) != a).float().mean().item()
    assert fooled["pgd"] > fooled["fgsm"] + 0.05
    assert fooled["fgsm"] > 1 - clean_acc  # FGSM does something too


# Rows whose chunks need what their `prepare` hook makes from the train split (gan_augment's latent pairs) are
# tested with that state in tests/test_gan.py (group_dro, jtt: tests/test_mitigations.py); a row that takes no
# minibatch steps (dfr) makes no chunks.
UNPREPARED_ROWS = [row for row, settings in fine_tuned_rows().items()
                   if MODES.get(settings["mode"]).prepare is None and MODES.get(settings["mode"]).make_chunks]


@pytest.mark.parametrize("row", UNPREPARED_ROWS)
@pytest.mark.parametrize("attack_model", ATTACK_MODELS)
def test_making_the_chunks_changes_no_parameter_or_buffer(row, attack_model):
    """Every fine-tuning row (each ASAC attack, each comparator): |E| chunks of the minibatch's labels, and the
    attacks and scoring run in eval mode without gradients, against the frozen snapshot or the live model."""
    model = create_model("small_cnn").train()  # training mode: eval must be forced inside
    before = copy.deepcopy(model.state_dict())
    x, a = _batch()
    y = 1 - a
    cfg = Config()
    cfg.finetune = replace(cfg.finetune, **fine_tuned_rows()[row], attack_model=attack_model, pgd_steps=2)
    stage = build_stage3(model, cfg, Accelerator(cpu=True), torch.Generator().manual_seed(0))
    chunks = stage.mode.make_chunks(stage.ctx, x, y, a)
    assert len(chunks) == len(magnitudes(cfg.finetune.eps)) == 3
    assert all(set(chunk.labels.tolist()) <= set(y.tolist()) for chunk in chunks)
    assert model.training  # mode restored for the training step
    after = model.state_dict()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name  # incl. BN running_mean/var and num_batches_tracked
    assert all(p.grad is None for p in model.parameters())
