"""ε calibration: bisection reaches each attack-success target on a toy classifier whose rate is known."""

import pytest
import torch

from distributed_asac.attacks import ATTACKS, create_attack
from distributed_asac.calibration import TOLERANCE, attack_success, calibrate_eps, success_rate
from distributed_asac.config import FinetuneConfig, load_config
from distributed_asac.errors import UserError

# 200 grey images, image i uniformly grey at v_i = 0.3 + 0.4·i/199, all of protected class 1. The toy C says
# class 1 when the mean pixel exceeds 0.25, so every ASAC moves all pixels down by ε (FGSM exactly; PGD up to
# its ε-ball) and fools C once v_i − ε < 0.25: the success rate at ε is the share of v_i below 0.25 + ε.
GREYS = 0.3 + 0.4 * torch.arange(200) / 199
X = GREYS.view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()
A = torch.ones(200, dtype=torch.long)


def toy_c(x: torch.Tensor) -> torch.Tensor:
    score = 50 * (x.mean((1, 2, 3)) - 0.25)  # [n]
    return torch.stack([-score, score], 1)  # logits [n, 2]


def true_rate(eps: float) -> float:
    return float((GREYS < 0.25 + eps).float().mean())


@pytest.mark.parametrize("name", ATTACKS.names())
def test_bisection_reaches_each_target(name):
    attack = create_attack(name, FinetuneConfig(pgd_steps=5))
    chosen = calibrate_eps(attack, toy_c, X, A, [0.25, 0.5, 0.75], batch_size=64)
    assert [c.target for c in chosen] == [0.25, 0.5, 0.75]
    for c in chosen:
        assert c.rate >= c.target and c.rate == success_rate(attack, toy_c, X, A, c.eps, 64)
        # the smallest such ε, to the tolerance: the true rate just below it misses the target
        assert true_rate(c.eps - 2 * TOLERANCE) < c.target <= true_rate(c.eps + 2 * TOLERANCE)
    assert chosen[0].eps < chosen[1].eps < chosen[2].eps
    assert chosen[1].eps == pytest.approx(0.25, abs=0.01)  # v_i − 0.25 has median 0.25


@pytest.mark.parametrize("name", ATTACKS.names())
def test_attack_success_counts_only_images_c_got_right_when_clean(name):
    # toy_c says class 1 above a mean pixel of 0.25; each attack moves a grey image away from its label a by ε.
    greys = torch.tensor([0.5, 0.3, 0.1, 0.3, 0.2])
    a = torch.tensor([1, 1, 1, 0, 0])
    # right when clean: 0.5/1, 0.3/1, 0.2/0; wrong when clean (never counted, although still wrong after the attack):
    # 0.1/1 and 0.3/0. At ε = 0.1 the attack flips 0.3/1 (to 0.2) and 0.2/0 (to 0.3); at 0.3 also 0.5/1 (to 0.2).
    x = greys.view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()
    outcome = attack_success(create_attack(name, FinetuneConfig(pgd_steps=20)), toy_c, x, a, [0.0, 0.1, 0.3], 2)
    assert (outcome.n, outcome.clean_correct, outcome.fooled) == (5, 3, [0, 2, 3])
    assert outcome.clean_accuracy == pytest.approx(0.6) and outcome.rate(1) == pytest.approx(0.4)


def test_unreachable_target_is_one_clear_error():
    def never(x):  # a C that no perturbation fools: its logits do not move with x
        return torch.tensor([-5.0, 5.0]) + 0 * x.mean((1, 2, 3)).unsqueeze(1)
    with pytest.raises(UserError, match=r"0.5 is unreachable: for ε ≤ 1 the ASACs fool C on at most 0.0%"):
        calibrate_eps(create_attack("fgsm", FinetuneConfig()), never, X, A, [0.5])


@pytest.mark.parametrize("override, message", [
    ("finetune.attack_success_targets=[0.5,1.0]", "1.0 is outside (0, 1)"),
    ("finetune.attack_success_targets=[0]", "0 is outside (0, 1)"),
    ("finetune.eps_mode=calibrate", "unknown value 'calibrate'"),
])
def test_bad_calibration_config(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_empty_targets_refused_only_when_calibrating():
    load_config(None, ["finetune.attack_success_targets=[]"])
    with pytest.raises(UserError, match="is empty but finetune.eps_mode is calibrated"):
        load_config(None, ["finetune.attack_success_targets=[]", "finetune.eps_mode=calibrated"])


def test_calibrated_stage_3_logs_its_eps_and_rates(tmp_path, smoke_config):
    from distributed_asac import pipeline

    cfg = smoke_config(tmp_path, "tracking.enabled=false", "finetune.eps_mode=calibrated",
                       "finetune.attack_success_targets=[0.2,0.4]", "finetune.calibration_images=64",
                       "analysis.ig_images=0", "analysis.robustness_images=0")
    report = pipeline.run(cfg).results["asac_fgsm"]
    eps = [report["calibrated_eps_0.2"], report["calibrated_eps_0.4"]]
    assert 0 < eps[0] < eps[1] <= 1
    assert report["calibrated_attack_success_0.2"] >= 0.2 and report["calibrated_attack_success_0.4"] >= 0.4
