"""Robustness curves and Integrated Gradients against direct computations."""

import pytest
import torch
from torch import nn

from distributed_asac.analysis import (box_share, gradient_alignment, ig_mouth_share, per_image_cosine, probe_warning,
                                      robustness_curve)
from distributed_asac.attacks import fgsm
from distributed_asac.models import create_model


def test_box_share_hand_computed():
    attributions = torch.zeros(2, 4, 4)
    attributions[0, 1, 1] = 3.0  # inside [1, 3) × [1, 3)
    attributions[0, 3, 3] = 1.0  # outside
    attributions[1] = 1.0  # uniform: 4 of 16 pixels inside
    boxes = torch.tensor([[1, 1, 3, 3], [1, 1, 3, 3]])
    torch.testing.assert_close(box_share(attributions, boxes), torch.tensor([0.75, 0.25]))


class _MouthOnly(nn.Module):
    """target logit = Σ of the pixels inside the box (all channels); everything else ignored."""

    def __init__(self, box):
        super().__init__()
        self.box = box

    def target_logits(self, x):
        x0, y0, x1, y1 = self.box
        s = x[:, :, y0:y1, x0:x1].sum((1, 2, 3))
        return torch.stack([-s, s], 1)


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, n, box):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 3, 16, 16, generator=g)
        self.box = box

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], 1, 0, i

    def mouth_box(self, i):
        return torch.tensor(self.box)


def test_ig_puts_everything_in_the_box_for_a_box_only_model():
    box = (4, 10, 12, 14)
    share = ig_mouth_share(_MouthOnly(box), _Dataset(5, box), n_images=5, steps=8, device=torch.device("cpu"))
    assert share["IG_mouth_share"] > 0.999
    assert abs(share["mouth_area_share"] - (8 * 4) / 256) < 1e-9


def test_robustness_curve_at_zero_is_clean_accuracy_and_c_falls():
    torch.manual_seed(0)
    model = create_model("small_cnn").eval()
    data = _Dataset(40, (0, 0, 1, 1))
    curve = robustness_curve(model, model, data, [0.0, 0.1], n_images=40, batch_size=16, device=torch.device("cpu"))
    with torch.no_grad():
        target, protected = model(data.x)
    assert curve[0]["target_ACC"] == 100 * float((target.argmax(1) == 1).float().mean())
    assert curve[0]["protected_ACC"] == 100 * float((protected.argmax(1) == 0).float().mean())
    assert curve[1]["protected_ACC"] <= curve[0]["protected_ACC"]  # FGSM against C does not help C
    assert "attacker_protected_ACC" not in curve[0]  # its own C: no second C to report


def test_robustness_curve_attacks_the_attackers_c_not_the_models_own():
    torch.manual_seed(0)
    model, attacker = create_model("small_cnn").eval(), create_model("small_cnn").eval()
    data = _Dataset(24, (0, 0, 1, 1))
    eps = [0.0, 0.05]
    from_attacker = robustness_curve(model, attacker, data, eps, n_images=24, batch_size=8, device=torch.device("cpu"))
    own = robustness_curve(model, model, data, eps, n_images=24, batch_size=8, device=torch.device("cpu"))
    asacs = fgsm(attacker.protected_logits, data.x, torch.zeros(24, dtype=torch.long), eps)[1]  # [24, 3, 16, 16]
    with torch.no_grad():
        target, protected = model(asacs)
        attacked = attacker.protected_logits(asacs)
    expected = {"target_ACC": target.argmax(1) == 1, "protected_ACC": protected.argmax(1) == 0,
                "attacker_protected_ACC": attacked.argmax(1) == 0}
    for column, hits in expected.items():
        assert from_attacker[1][column] == pytest.approx(100 * float(hits.float().mean()))
    assert from_attacker[0]["target_ACC"] == own[0]["target_ACC"]  # ε = 0: the same clean images
    # the two sources make different images: C's outputs on them differ
    assert (from_attacker[1]["protected_ACC"], from_attacker[1]["target_ACC"]) != (own[1]["protected_ACC"],
                                                                                  own[1]["target_ACC"])


class _Linear(nn.Module):
    """A two-head model on flattened pixels whose heads can be tied: C = M's head when `tied`."""

    def __init__(self, tied: bool, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.target = nn.Linear(3 * 16 * 16, 2)
        self.protected = nn.Linear(3 * 16 * 16, 2)
        with torch.no_grad():
            self.target.weight.copy_(torch.randn(2, 768, generator=g) * 0.05)
            self.protected.weight.copy_(self.target.weight if tied else torch.randn(2, 768, generator=g) * 0.05)
            self.protected.bias.copy_(self.target.bias)

    def forward(self, x):
        return self.target(x.flatten(1)), self.protected(x.flatten(1))

    def target_logits(self, x):
        return self(x)[0]

    def protected_logits(self, x):
        return self(x)[1]


class _Labelled(_Dataset):
    def __init__(self, n, a_equals_y: bool):
        super().__init__(n, (0, 0, 1, 1))
        self.y = torch.arange(n) % 2
        self.a = self.y if a_equals_y else 1 - self.y

    def __getitem__(self, i):
        return self.x[i], int(self.y[i]), int(self.a[i]), i


@pytest.mark.parametrize("a_equals_y, cosine", [(True, 1.0), (False, -1.0)])
def test_gradient_cosine_is_plus_or_minus_one_when_c_is_ms_head(a_equals_y, cosine):
    # C = M's head: with a = y the two losses are one, with a = 1 − y their input gradients are opposite (for two
    # classes, ∇_logits CE(·, 0) = −p₁·(1, −1) and ∇_logits CE(·, 1) = p₀·(1, −1)).
    model = _Linear(tied=True, seed=0)
    out = gradient_alignment(model, model, _Labelled(12, a_equals_y), [0.0, 0.01], n_images=12, batch_size=5,
                             device=torch.device("cpu"))
    for key in ("grad_cosine_mean", "grad_cosine_q25", "grad_cosine_median", "grad_cosine_q75"):
        assert out[key] == pytest.approx(cosine, abs=1e-5)
    assert out["grad_abs_cosine_mean"] == pytest.approx(1.0, abs=1e-5)


class _Mixed(_Labelled):
    """Images 0..3 with a = y, images 4..7 with a = 1 − y (C = M's head: cos +1 on the first, −1 on the rest)."""

    def __init__(self):
        super().__init__(8, a_equals_y=True)
        self.a = torch.where(torch.arange(8) < 4, self.y, 1 - self.y)


def test_abs_cosine_quartiles_see_alignment_that_the_signed_ones_split():
    # Signed cosines, sorted: four −1 then four +1; torch's linear quantiles at positions 0.25·7, 0.5·7, 0.75·7 =
    # 1.75, 3.5, 5.25 give −1, 0 (halfway from −1 to +1) and +1, and the mean is 0. Every |cos| is 1: so are its
    # quartiles.
    model = _Linear(tied=True, seed=0)
    out = gradient_alignment(model, model, _Mixed(), [0.01], n_images=8, batch_size=3, device=torch.device("cpu"))
    assert [out[f"grad_cosine_{q}"] for q in ("q25", "median", "q75")] == pytest.approx([-1.0, 0.0, 1.0], abs=1e-5)
    assert [out[f"grad_abs_cosine_{q}"] for q in ("q25", "median", "q75")] == pytest.approx([1.0] * 3, abs=1e-5)
    assert out["grad_cosine_mean"] == pytest.approx(0.0, abs=1e-5)


def test_per_image_cosine_holds_for_tiny_gradients_and_leaves_out_vanished_ones():
    # A confident model's input gradients are 1e-20 and smaller: in float32 the product of their norms underflows
    # (torch's cosine_similarity then returned |cos| > 1). Hand values: parallel 1, opposite −1, orthogonal 0.
    u = torch.tensor([[3.0, 4.0], [1.0, 0.0], [1.0, 2.0], [0.0, 0.0]]).view(4, 1, 2)
    v = torch.tensor([[6.0, 8.0], [-2.0, 0.0], [2.0, -1.0], [1.0, 1.0]]).view(4, 1, 2)
    cos = per_image_cosine(u * 1e-30, v * 1e-12)
    assert cos[:3].tolist() == pytest.approx([1.0, -1.0, 0.0], abs=1e-12) and cos[3].isnan()


def test_gradient_cosine_and_flips_on_independent_heads_match_a_direct_computation():
    model, attacker = _Linear(tied=False, seed=1), _Linear(tied=False, seed=2)
    data = _Labelled(10, a_equals_y=True)
    out = gradient_alignment(model, attacker, data, [0.0, 0.5], n_images=10, batch_size=4,
                             device=torch.device("cpu"))
    cosines, flips = [], 0
    for i in range(10):  # one image at a time, by hand: a linear model's input gradient is W^T (p − onehot)
        x, y, a, _ = data[i]
        p_m = torch.softmax(model.target_logits(x[None]), 1)[0].detach()
        p_c = torch.softmax(attacker.protected_logits(x[None]), 1)[0].detach()
        grad_m = model.target.weight.detach().T @ (p_m - torch.eye(2)[y])
        grad_c = attacker.protected.weight.detach().T @ (p_c - torch.eye(2)[a])
        cosines.append(float(grad_m @ grad_c / (grad_m.norm() * grad_c.norm())))
        asac = (x.flatten() + 0.5 * grad_c.sign()).clamp(0, 1).view(1, 3, 16, 16)
        flips += int(model.target_logits(asac).argmax(1) != model.target_logits(x[None]).argmax(1))
    assert out["grad_cosine_mean"] == pytest.approx(sum(cosines) / 10, abs=1e-5)
    assert out["grad_abs_cosine_mean"] == pytest.approx(sum(map(abs, cosines)) / 10, abs=1e-5)
    assert out["grad_cosine_median"] == pytest.approx(float(torch.tensor(cosines).double().quantile(0.5)), abs=1e-5)
    by_hand = sorted(map(abs, cosines))  # ten values: the quartiles at positions 2.25, 4.5, 6.75 interpolate
    for name, low, share in (("q25", 2, 0.25), ("median", 4, 0.5), ("q75", 6, 0.75)):
        expected = by_hand[low] + share * (by_hand[low + 1] - by_hand[low])
        assert out[f"grad_abs_cosine_{name}"] == pytest.approx(expected, abs=1e-5), name
    assert abs(out["grad_cosine_mean"]) < 0.5  # independent random heads: far from ±1
    assert out["asac_flips_M_eps_0.5"] == out["asac_flips_M"] == flips / 10
    assert 0 < flips < 10  # the case tells flipped from kept apart


def test_ig_figure_has_a_panel_per_image_and_model(tmp_path):
    from distributed_asac.report import plot_ig_figure

    images = torch.rand(8, 3, 16, 16)
    boxes = torch.tensor([[4, 8, 12, 12]] * 8)
    maps = {name: torch.rand(8, 16, 16) for name in ("base", "plain", "asac_fgsm")}
    panels = plot_ig_figure(images, [(i // 4, i % 2) for i in range(8)], boxes, maps, tmp_path / "fig.png")
    assert panels == 8 * 4 and (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"


def test_figure_indices_take_the_first_images_of_each_group():
    class Labels:
        targets = torch.tensor([1, 0, 0, 1, 0, 1, 0, 1, 1])
        protected_labels = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0, 1])

    from distributed_asac.analysis import figure_indices

    # groups (y, a): 0:(1,1) 1:(0,0) 2:(0,1) 3:(1,0) 4:(0,0) 5:(1,1) 6:(0,1) 7:(1,0) 8:(1,1)
    assert figure_indices(Labels(), per_group=2) == [1, 4, 2, 6, 3, 7, 0, 5]


@pytest.mark.parametrize("report, warns", [
    ({"protected_ACC_y_ne_a": 18.3, "grad_abs_cosine_q75": 0.91}, True),  # the paper regime's base
    ({"protected_ACC_y_ne_a": 97.7, "grad_abs_cosine_q75": 0.30}, False),  # the feature-rich regime's
    ({"protected_ACC_y_ne_a": 49.9, "grad_abs_cosine_q75": 0.30}, True),  # follows the target on most such images
    ({"protected_ACC_y_ne_a": 50.0, "grad_abs_cosine_q75": 0.80}, False),  # both at their limits: no warning
    ({"grad_abs_cosine_q75": 0.81}, True),  # a base measured before the split accuracy existed
    ({}, False),
])
def test_probe_warning_names_the_numbers_past_their_limits(report, warns):
    warning = probe_warning(report, "Smiling", "Male")
    assert (warning is not None) == warns
    if warns:
        assert warning.startswith("the attacked C reads Male through Smiling (")
        assert "expect it to raise DEO, not lower it" in warning  # what the paper regime measured
        if "protected_ACC_y_ne_a" in report:
            assert f"right on {report['protected_ACC_y_ne_a']:.1f}% of the test images where Smiling differs" in warning
        assert f"upper quartile {report['grad_abs_cosine_q75']:.2f}" in warning


def test_a_runs_summary_warns_when_its_asac_rows_attacked_such_a_c(tmp_path):
    """The warning under the run's table: from the base's numbers in the run, or from the base checkpoint's
    probe/results.json (a sweep trial); never for a run without an ASAC row."""
    import json

    from distributed_asac import pipeline
    from distributed_asac.config import load_config

    cfg = load_config(None, [f"output_dir={tmp_path}"])
    reads = {"protected_ACC_y_ne_a": 18.3, "grad_abs_cosine_q75": 0.91, "DEO": 0.05, "ACC": 90.0}
    asac = {"DEO": 0.09, "ACC": 89.0, "attack_success_rate": 0.6}
    table = pipeline.write_summary(tmp_path, {"base": reads, "asac_fgsm": asac}, cfg)
    assert "**Warning**: the attacked C reads Male through Smiling" in table
    assert "**Warning**" in (tmp_path / "table.md").read_text()
    assert "Warning" not in pipeline.write_summary(tmp_path, {"base": reads, "plain": {"DEO": 0.05}}, cfg)
    checkpoint = tmp_path / "base" / "probe"
    checkpoint.mkdir(parents=True)
    (checkpoint / "results.json").write_text(json.dumps({"probe": reads}))
    given = load_config(None, [f"output_dir={tmp_path}", f"base_checkpoint={checkpoint}"])
    assert pipeline.asac_warning({"asac_fgsm": asac}, given).startswith("the attacked C reads Male through Smiling")
    (checkpoint / "results.json").write_text(json.dumps({"probe": {"protected_ACC_y_ne_a": 97.7}}))
    assert pipeline.asac_warning({"asac_fgsm": asac}, given) is None
