"""The `dfr` row: Deep Feature Reweighting, DFR^Val_Tr (Kirichenko et al. 2023): the backbone frozen, the target
head refit by ℓ1-regularised logistic regression on a group-balanced subset of the valid split (never test).

As the authors' code does it (PolinaKirichenko/deep_feature_reweighting, dfr_evaluate_spurious.py): features are
the backbone's outputs (model in eval mode), standardised; the inverse regularisation strength C is chosen from
`dfr.c_grid` (by default the code's grid for the dataset: `c_grid`) by the worst-group accuracy on one half of
valid of a model fit on a balanced subset of the other half (standardised on that subset); the final head is the
mean of `dfr.retrains` fits at that C, each on a fresh balanced draw of the whole valid split, standardised with
the train split's feature statistics. The objective is liblinear's, ‖w‖₁ + C Σᵢ log(1 + exp(−sᵢ w·[xᵢ, 1])) with
the intercept a penalised feature (`l1_logistic`, solved here by FISTA instead of by scikit-learn, which the package
does not depend on). The one departure: the halves are split within each group, so that both hold every group (the
code splits at random).

So valid is spent: DFR trains on its balanced subsets and selects C on its halves; no epoch is selected on it
(there are no epochs: no minibatch step of stage 3, the backbone and the protected head untouched), and the
finetune.epochs / select / lr keys do not apply. The logistic regression's weights are folded into the target
head (logit of class 1 minus logit of class 0 = w·standardised features + b), so the model keeps its form.
"""

from __future__ import annotations

import torch
from accelerate.utils import broadcast

from ..models import TwoHeadModel
from ..rows import MODES, Mode
from .groups import GROUPS, check_groups, dataset_groups, forward_pass

MIN_PER_GROUP = 2  # every group in both halves of valid (one to fit on, one to choose C on)

# The C grids of the DFR code (PolinaKirichenko/deep_feature_reweighting, dfr_evaluate_spurious.py, commit 46666e6,
# its C_OPTIONS): the WaterBirds grid it runs, and the CelebA grid it gives beside it (commented out there, as each
# dataset's run swaps its lines in) with REG = "l1".
WATERBIRDS_C_GRID = [1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01]
C_GRIDS = {"celeba": [3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003]}  # data.name → its published grid


def c_grid(cfg) -> list[float]:
    """The C tried: `dfr.c_grid` when the user set it, else the DFR code's grid for `data.name` (CelebA's for celeba,
    WaterBirds' for every other dataset, the generated one included)."""
    return list(cfg.dfr.c_grid if cfg.dfr.c_grid is not None else C_GRIDS.get(cfg.data.name, WATERBIRDS_C_GRID))


def l1_logistic(x: torch.Tensor, y: torch.Tensor, c: float, iterations: int = 20000, tol: float = 1e-8) -> torch.Tensor:
    """argmin_w ‖w‖₁ + c · Σᵢ log(1 + exp(−sᵢ · w·[xᵢ, 1])), sᵢ = 2yᵢ − 1 (liblinear's ℓ1 logistic regression with
    intercept_scaling 1: the intercept is the last weight, penalised like the others), by FISTA with restarts.
    x [n, d], y [n] in {0, 1} → w [d + 1] (float64)."""
    design = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1) * (2.0 * y.double() - 1.0)[:, None]
    step = 4.0 / (c * torch.linalg.matrix_norm(design, 2) ** 2)  # 1 / Lipschitz constant of the smooth part

    def smooth_gradient(w: torch.Tensor) -> torch.Tensor:
        return -c * design.T @ torch.sigmoid(-design @ w)

    def objective(w: torch.Tensor) -> float:
        return float(w.abs().sum() + c * torch.nn.functional.softplus(-design @ w).sum())

    w = z = torch.zeros(design.shape[1], dtype=torch.float64)
    t, last = 1.0, objective(w)
    for _ in range(iterations):
        moved = z - step * smooth_gradient(z)
        new = moved.sign() * (moved.abs() - step).clamp(min=0)  # the prox of step·‖·‖₁
        value = objective(new)
        if value > last:  # restart the momentum (O'Donoghue & Candès 2015)
            t, z = 1.0, w
            continue
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        z, t = new + (t - 1) / t_next * (new - w), t_next
        done = float((new - w).abs().max()) <= tol * max(1.0, float(new.abs().max()))
        w, last = new, value
        if done:
            break
    return w


def balanced_draw(groups: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Positions of a group-balanced subset of `groups` [n]: from every group, as many images (drawn at random) as
    the smallest group holds. Sorted."""
    members = [(groups == g).nonzero().squeeze(1) for g in range(GROUPS)]
    size = min(len(m) for m in members)
    return torch.cat([m[torch.randperm(len(m), generator=generator)[:size]] for m in members]).sort().values


def halves(groups: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint halves of the positions of `groups`, split within each group (the first half gets the larger
    part of an odd group), so that both hold every group that has two images or more."""
    first, second = [], []
    for g in range(GROUPS):
        m = (groups == g).nonzero().squeeze(1)
        m = m[torch.randperm(len(m), generator=generator)]
        first.append(m[:(len(m) + 1) // 2])
        second.append(m[(len(m) + 1) // 2:])
    return torch.cat(first).sort().values, torch.cat(second).sort().values


def worst_group_accuracy(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor) -> float:
    """The lowest accuracy over the groups present of the logistic regression w on x [n, d]."""
    correct = ((torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ w > 0).long() == y).double()
    return min(float(correct[groups == g].mean()) for g in range(GROUPS) if bool((groups == g).any()))


def _standardiser(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's StandardScaler: the mean and the population standard deviation (1 where it is 0)."""
    std = features.std(0, unbiased=False)
    return features.mean(0), torch.where(std > 0, std, torch.ones_like(std))


def choose_c(features: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, c_grid: list[float],
             generator: torch.Generator) -> tuple[float, dict[float, float]]:
    """The C of `c_grid` whose fit on a balanced subset of one half has the best worst-group accuracy on the other
    half (the first such C in grid order on a tie), and every C's worst-group accuracy."""
    fit_half, held_half = halves(groups, generator)
    chosen = fit_half[balanced_draw(groups[fit_half], generator)]
    mean, std = _standardiser(features[chosen])
    scores = {c: worst_group_accuracy(l1_logistic((features[chosen] - mean) / std, y[chosen], c),
                                      (features[held_half] - mean) / std, y[held_half], groups[held_half])
              for c in c_grid}
    return max(scores, key=lambda c: (scores[c], -c_grid.index(c))), scores


def set_target_head(model: TwoHeadModel, w: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
    """ρ such that logit₁ − logit₀ = w·[(f − mean) / std, 1] for features f: class 0's row and bias 0."""
    weight, bias = w[:-1] / std, w[-1] - (w[:-1] * mean / std).sum()
    head = model.target_head
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[1] = weight.to(head.weight)
        head.bias[1] = bias.to(head.bias)


def retrain_last_layer(model: TwoHeadModel, train_set, valid_set, cfg, accelerator, tracker) -> tuple[TwoHeadModel, dict[str, float]]:
    """The `fit` hook (stage 3 of this row): C chosen on valid's halves, then the averaged head set into `model`."""
    generator = torch.Generator().manual_seed(cfg.seed)
    device, batch = accelerator.device, cfg.finetune.batch_size
    valid_features = forward_pass(model, valid_set, batch, device)[0].double()  # [n_valid, d]
    y, groups = valid_set.targets.long(), dataset_groups(valid_set)
    check_groups(groups, MIN_PER_GROUP, "finetune.mode=dfr (the valid split)")
    best, scores = choose_c(valid_features, y, groups, c_grid(cfg), generator)
    mean, std = _standardiser(forward_pass(model, train_set, batch, device)[0].double())
    fits = []
    for _ in range(cfg.dfr.retrains):
        draw = balanced_draw(groups, generator)
        fits.append(l1_logistic((valid_features[draw] - mean) / std, y[draw], best))
    w = torch.stack(fits).mean(0)
    set_target_head(model, w, mean, std)
    if accelerator.num_processes > 1:  # the main process's head on every rank (replicas are checked bit for bit)
        for p in model.target_head.parameters():
            p.data.copy_(broadcast(p.data.clone(), from_process=0))
    summary = {"dfr_C": best, "dfr_tune_worst_group_ACC": 100.0 * scores[best],
               "dfr_images_per_group": float(int(torch.bincount(groups, minlength=GROUPS).min())),
               "dfr_nonzero_weights": float((w[:-1] != 0).sum())}
    summary.update({f"dfr_tune_worst_group_ACC_C_{c:g}": 100.0 * s for c, s in scores.items()})
    tracker.log_metrics({f"finetune/{k}": v for k, v in summary.items()})
    return model, summary


def _check_valid(cfg, splits) -> None:
    check_groups(dataset_groups(splits.valid), MIN_PER_GROUP, "finetune.mode=dfr (the valid split)")


MODES.register("dfr")(Mode(None, {"dfr": {}}, check_splits=_check_valid, fit=retrain_last_layer))
