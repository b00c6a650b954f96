"""The claims table (tune/claims.py): selectors, paired differences against hand values, every verdict word,
the forest plot, bad claims sections, and the claims study resolving to the trials it was designed with."""

from __future__ import annotations

import csv
import math

import matplotlib.image
import pytest
from scipy import stats as scipy_stats

from distributed_asac.config import load_config
from distributed_asac.errors import UserError
from tune.between import Other, between
from tune.claims import (CONTRADICTED, NOT_DETECTABLE, SUPPORTED, claim_metrics, matches, measure, metric_unit,
                         parse_claims, select, write_claims)
from tune.records import TrialRecord
from tune.report import write_report
from tune.spec import base_key, load_sweep

STRONG, MILD = {"synthetic_bias": 0.9, "root": "/d/strong"}, {"synthetic_bias": 0.6, "root": "/d/mild"}
ASAC, PLAIN = {"mode": "asac", "attack": "fgsm"}, {"mode": "plain"}


def record(data, finetune, seed, metrics, base=None, status="finished", **axes):
    return TrialRecord(name=f"t-{seed}", axes={"data": data, "finetune": finetune, **axes, "seed": seed}, grids=["g"],
                       status=status, model=finetune["mode"], metrics=metrics, base=base)


def section(claims, tables=None):
    return {"regimes": {"strong": {"data": {"synthetic_bias": 0.9}}, "mild": {"data": {"synthetic_bias": 0.6}}},
            "tables": tables or {"main": ["strong", "mild"]}, "list": claims}


def claim(id_, metric, expect, treatment, reference, **extra):
    return {"id": id_, "claim": f"claim {id_}", "paper": "Table 1", "metric": metric, "expect": expect,
            "treatment": treatment, "reference": reference, **extra}


# Per seed (DEO of ASAC, DEO of plain, DEO of the base) in each regime, chosen so that each verdict is reached:
# strong: ASAC − plain = −0.10 ± small (supported: lower); mild: ASAC − plain = +0.10 ± small (contradicted);
# ASAC − base: alternating signs (not detectable).
SEEDS = [0, 1, 2, 3, 4]
STRONG_DEO = {"asac": [0.30, 0.31, 0.29, 0.30, 0.32], "plain": [0.40, 0.40, 0.40, 0.41, 0.41],
              "base": [0.20, 0.41, 0.19, 0.42, 0.22]}
MILD_DEO = {"asac": [0.20, 0.21, 0.22, 0.20, 0.21], "plain": [0.10, 0.10, 0.11, 0.10, 0.12],
            "base": [0.10, 0.31, 0.12, 0.30, 0.11]}


def records():
    out = []
    for data, deo in ((STRONG, STRONG_DEO), (MILD, MILD_DEO)):
        for s in SEEDS:
            base = {"DEO": deo["base"][s], "ACC": 80.0,
                    "robustness": [{"eps": 0.0, "target_ACC": 80.0, "protected_ACC": 95.0},
                                   {"eps": 0.05, "target_ACC": 60.0, "protected_ACC": 40.0}]}
            robust = [{"eps": 0.0, "target_ACC": 82.0 + s, "protected_ACC": 96.0},
                      {"eps": 0.05, "target_ACC": 70.0 + s, "protected_ACC": 30.0 + s}]
            out.append(record(data, ASAC, s, {"DEO": deo["asac"][s], "ACC": 81.0, "robustness": robust}, base))
            out.append(record(data, PLAIN, s, {"DEO": deo["plain"][s], "ACC": 81.0}, base))
    out.append(record(STRONG, {"mode": "adv_augment"}, 0, {}, status="failed"))  # left out of every measurement
    return out


def t_half_width(differences):
    n = len(differences)
    sd = math.sqrt(sum((d - sum(differences) / n) ** 2 for d in differences) / (n - 1))
    return scipy_stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)


def test_matches_subset_of_section_axes_and_exact_values():
    axes = {"data": STRONG, "finetune": {"mode": "asac", "attack": "fgsm", "eps_mode": "fixed"}, "alpha": 0.5, "seed": 0}
    assert matches(axes, {"data": {"synthetic_bias": 0.9}, "finetune": {"mode": "asac"}})
    assert not matches(axes, {"data": {"synthetic_bias": 0.6}})
    assert not matches(axes, {"alpha": 0.3})
    assert not matches(axes, {"order": "random"})  # an axis the trial does not have
    assert not matches(axes, {"finetune": {"mode": "asac", "attack": "pgd"}})


def test_each_verdict_word_and_the_paired_numbers():
    claims = parse_claims("test", section([
        claim("lowerDEO", "DEO", "lower", {"finetune": ASAC}, {"finetune": PLAIN}),
        claim("vsBase", "DEO", "lower", {"finetune": ASAC}, "base"),
        claim("twoSided", "DEO", "none", {"finetune": ASAC}, {"finetune": PLAIN}),
        claim("fooled", "robust_protected_ACC_eps_0.05", "lower", {"finetune": ASAC}, "same",
              reference_metric="robust_protected_ACC_eps_0"),
        claim("robustM", "robust_target_ACC_eps_0.05", "higher", {"finetune": ASAC}, "base"),
    ]))
    got = {(m.claim.id, m.regime): m for m in measure(records(), claims)}
    strong = got[("lowerDEO", "strong")]
    differences = [a - p for a, p in zip(STRONG_DEO["asac"], STRONG_DEO["plain"])]
    assert strong.interval.n == 5
    assert strong.interval.estimate == pytest.approx(sum(differences) / 5)
    assert strong.interval.half_width == pytest.approx(t_half_width(differences))
    assert strong.verdict == SUPPORTED
    assert got[("lowerDEO", "mild")].verdict == CONTRADICTED
    assert got[("vsBase", "strong")].verdict == NOT_DETECTABLE
    assert got[("twoSided", "strong")].verdict == "lower" and got[("twoSided", "mild")].verdict == "higher"
    # The same model's ASAC accuracy of C (30 + s) against its clean accuracy (96): 66 − s points lower.
    fooled = got[("fooled", "strong")]
    assert fooled.interval.estimate == pytest.approx(sum(30 + s - 96 for s in SEEDS) / 5) and fooled.verdict == SUPPORTED
    assert got[("robustM", "mild")].interval.estimate == pytest.approx(sum(70 + s - 60 for s in SEEDS) / 5)


def test_one_seed_is_not_detectable_and_a_missing_setting_is_an_empty_cell():
    claims = parse_claims("test", section([claim("C", "DEO", "lower", {"finetune": ASAC}, {"finetune": {"mode": "x"}}),
                                           claim("D", "DEO", "lower", {"finetune": ASAC}, {"finetune": PLAIN})]))
    one_seed = [r for r in records() if r.axes["seed"] == 0]
    got = {(m.claim.id, m.regime): m for m in measure(one_seed, claims)}
    assert got[("C", "strong")].interval is None
    assert got[("D", "strong")].interval.n == 1 and got[("D", "strong")].verdict == NOT_DETECTABLE


def test_ambiguous_selector_is_one_clear_error():
    two_asacs = records() + [record(STRONG, {**ASAC, "eps_mode": "calibrated"}, 0, {"DEO": 0.1})]
    claims = parse_claims("test", section([claim("C", "DEO", "lower", {"finetune": {"mode": "asac"}}, "base")]))
    with pytest.raises(UserError, match="matches 2 settings"):
        measure(two_asacs, claims)


def test_claim_metrics_flattens_both_robustness_curves():
    flat = claim_metrics({"DEO": 0.1, "note": "x", "flag": True, "nan": float("nan"),
                          "robustness": [{"eps": 0.05, "target_ACC": 70.0, "protected_ACC": 30.0}],
                          "robustness_own_C": [{"eps": 0.05, "target_ACC": 65.0, "protected_ACC": 10.0}]})
    assert flat == {"DEO": 0.1, "robust_target_ACC_eps_0.05": 70.0, "robust_protected_ACC_eps_0.05": 30.0,
                    "robust_own_target_ACC_eps_0.05": 65.0, "robust_own_protected_ACC_eps_0.05": 10.0}


def test_power_table_from_the_per_seed_spread(tmp_path):
    from distributed_asac.stats import detectable_effect, seeds_for_power

    claims = parse_claims("test", section([claim("C5", "DEO", "lower", {"finetune": ASAC}, {"finetune": PLAIN},
                                                 effect=-0.038),
                                           claim("C1", "DEO", "lower", {"finetune": ASAC}, "base")]))
    markdown, _ = write_claims(records(), claims, measure(records(), claims), tmp_path)
    differences = [a - p for a, p in zip(STRONG_DEO["asac"], STRONG_DEO["plain"])]
    mean = sum(differences) / 5
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 4)  # 0.00837 by hand
    row = next(line for line in markdown.splitlines() if line.startswith("| C5 | DEO | -0.038 | strong |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "5" and float(cells[5]) == pytest.approx(sd, rel=1e-3)
    assert int(cells[6]) == seeds_for_power(-0.038, sd) == 3  # a spread far below the effect: few seeds
    assert float(cells[7]) == pytest.approx(detectable_effect(sd, 5), rel=1e-3)
    power = markdown.split("### Power")[1].split("### Per seed")[0]
    assert "| C1 |" not in power  # no effect given: not in the power table


def test_per_seed_table_shows_each_seeds_base_and_differences(tmp_path):
    """Each regime's seeds with their base's ACC and DEO and each claim's difference at that seed, in claims.md and
    claims_per_seed.csv, against the hand-made values; a claim with no trial in a regime has no column there."""
    claims = parse_claims("test", section([claim("C1", "DEO", "lower", {"finetune": ASAC}, "base"),
                                           claim("C5", "DEO", "lower", {"finetune": ASAC}, {"finetune": PLAIN}),
                                           claim("none", "DEO", "lower", {"finetune": {"mode": "x"}}, "base")]))
    markdown, paths = write_claims(records(), claims, measure(records(), claims), tmp_path)
    assert tmp_path / "claims_per_seed.csv" in paths
    strong = markdown.split("### Per seed, regime `strong`")[1].split("### Per seed, regime `mild`")[0]
    assert "| Seed | Base ACC | Base DEO | C1 | C5 |" in strong
    for s in SEEDS:
        c1 = STRONG_DEO["asac"][s] - STRONG_DEO["base"][s]
        c5 = STRONG_DEO["asac"][s] - STRONG_DEO["plain"][s]
        assert f"| {s} | 80.00 | {STRONG_DEO['base'][s]:.3f} | {c1:+.3f} | {c5:+.3f} |" in strong
    with (tmp_path / "claims_per_seed.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["regime"], r["seed"]) for r in rows] == [("strong", str(s)) for s in SEEDS] + [
        ("mild", str(s)) for s in SEEDS]
    assert float(rows[7]["C5"]) == pytest.approx(MILD_DEO["asac"][2] - MILD_DEO["plain"][2])
    assert float(rows[7]["base_DEO"]) == pytest.approx(MILD_DEO["base"][2]) and "none" not in rows[0]


def test_per_seed_table_lists_seeds_in_numeric_order(tmp_path):
    """Seeds 10 and 2 read 2 before 10 in the table and the CSV (the 30-seed paper-regime table listed 0, 1, 10, 11,
    ..., 19, 2, 20 when seeds were sorted as text)."""
    base = {"DEO": 0.1, "ACC": 80.0}
    trials = [record(STRONG, ASAC, s, {"DEO": 0.1 + s / 100, "ACC": 81.0}, base) for s in (10, 2, 1)]
    claims = parse_claims("test", section([claim("C1", "DEO", "lower", {"finetune": ASAC}, "base")],
                                          tables={"main": ["strong"]}))
    markdown, _ = write_claims(trials, claims, measure(trials, claims), tmp_path)
    rows = [line.split("|")[1].strip() for line in markdown.split("### Per seed, regime `strong`")[1].splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert rows == ["1", "2", "10"]
    with (tmp_path / "claims_per_seed.csv").open() as f:
        assert [r["seed"] for r in csv.DictReader(f)] == ["1", "2", "10"]


def test_a_claims_effect_must_be_a_nonzero_number():
    with pytest.raises(UserError, match="'effect' must be a non-zero number"):
        parse_claims("claims.yaml", section([claim("C1", "DEO", "lower", {"finetune": ASAC}, "base", effect=0)]))


def test_written_tables_csv_and_forest_plot(tmp_path):
    claims = parse_claims("test", section(
        [claim("C1", "DEO", "lower", {"finetune": ASAC}, "base"), claim("C2", "ACC", "higher", {"finetune": ASAC}, "base"),
         claim("C5", "DEO", "lower", {"finetune": ASAC}, {"finetune": PLAIN})],
        tables={"main": ["strong", "mild"], "strong only": ["strong"]}))
    paths = write_report(records(), {"g": ["data", "finetune"]}, tmp_path, "Sweep test", claims)
    report = (tmp_path / "report.md").read_text()
    assert "### Claims table `main` (regimes: strong, mild)" in report and "### Claims table `strong only`" in report
    line = next(row for row in report.splitlines() if row.startswith("| **C5**"))
    assert line.count("**supported**") == 1 and line.count("**contradicted**") == 1
    with (tmp_path / "claims.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 and {r["verdict"] for r in rows} >= {SUPPORTED, CONTRADICTED}
    image = matplotlib.image.imread(tmp_path / "claims_forest.png")
    assert image.ndim == 3 and image.shape[0] > 100
    assert tmp_path / "claims_forest.png" in paths


@pytest.mark.parametrize("metric, panel", [
    ("DEO", "fairness gap"), ("DDP", "fairness gap"), ("DEOp", "fairness gap"), ("worst_group_ACC", "accuracy points"),
    ("robust_target_ACC_eps_0.05", "accuracy points"), ("IG_mouth_share", "share"), ("asac_flips_M", "share"),
    ("attack_success_rate", "share"), ("grad_cosine_q75", "cosine"), ("images_per_s", "images_per_s")])
def test_each_metric_is_drawn_on_the_axis_of_its_unit(metric, panel):
    """The forest plot puts claims on one x axis only when their numbers share a unit: a flip share or a cosine was
    drawn on the axis labelled "fairness gap"."""
    assert metric_unit(metric) == panel


def test_write_claims_without_any_finished_trial(tmp_path):
    claims = parse_claims("test", section([claim("C1", "DEO", "lower", {"finetune": ASAC}, "base")]))
    markdown, paths = write_claims([], claims, measure([], claims), tmp_path)
    assert "| **C1**" not in markdown and all(p.is_file() for p in paths)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("tables"), "exactly 'regimes', 'tables' and 'list'"),
    (lambda s: s["tables"].update(extra=["nowhere"]), "claims table 'extra' must list regimes"),
    (lambda s: s["list"][0].update(expect="smaller"), "'expect' must be one of lower, higher, none"),
    (lambda s: s["list"][0].update(colour="red"), "unknown key 'colour'"),
    (lambda s: s["list"][0].pop("metric"), "missing 'metric'"),
    (lambda s: s["list"][0].update(reference="same"), "give 'reference_metric'"),
    (lambda s: s["list"].append(dict(s["list"][0])), "names a claim id twice: C1"),
])
def test_bad_claims_section(change, message):
    data = section([claim("C1", "DEO", "lower", {"finetune": ASAC}, "base")])
    change(data)
    with pytest.raises(UserError, match=message):
        parse_claims("claims.yaml", data)


# The other sweep of the comparison between sweeps: one regime ("paper", bias 0.7), seeds 1-6 (1-4 in common with
# records()), per seed (DEO of ASAC, DEO of the base).
PAPER = {"synthetic_bias": 0.7, "root": "/d/paper"}
PAPER_DEO = {s: (0.10 + 0.01 * s, 0.05 + 0.02 * (s % 2)) for s in range(1, 7)}


def other_sweep(c1_metric="DEO"):
    claims = {"regimes": {"paper": {"data": {"synthetic_bias": 0.7}}}, "tables": {"main": ["paper"]},
              "list": [claim("C1", c1_metric, "lower", {"finetune": ASAC}, "base"),
                       claim("C5a", "DEO", "lower", {"finetune": ASAC}, {"finetune": PLAIN}),
                       claim("C2", "ACC", "higher", {"finetune": ASAC}, "base"),
                       claim("onlyThere", "DEO", "lower", {"finetune": ASAC}, "base")]}
    found = [record(PAPER, ASAC, s, {"DEO": asac, "ACC": 80.0}, {"DEO": base, "ACC": 80.0})
             for s, (asac, base) in PAPER_DEO.items()]
    found.append(record(PAPER, PLAIN, 9, {"DEO": 0.2}, {"DEO": 0.1}))  # plain on no common seed: C5a not compared
    return Other("paper_regime", found, parse_claims("other", claims))


def test_a_claim_compared_between_two_sweeps_pairs_by_seed(tmp_path):
    """ΔDEO against the base here minus there, per common seed, against hand-made values and scipy's t; the sides
    measured over the common seeds only; a claim of one id measuring another metric there is left out with a line."""
    here = parse_claims("here", section([claim("C1", "DEO", "lower", {"finetune": ASAC}, "base"),
                                          claim("C5a", "DEO", "lower", {"finetune": ASAC}, {"finetune": PLAIN}),
                                          claim("C2", "ACC", "higher", {"finetune": ASAC}, "base")]))
    comparisons, skipped = between(measure(records(), here), here, other_sweep())
    assert [(c.claim.id, c.regime) for c in comparisons] == [("C1", "strong"), ("C1", "mild"), ("C2", "strong"),
                                                               ("C2", "mild")]
    assert skipped == []
    strong = comparisons[0]
    seeds = [1, 2, 3, 4]
    mine = [STRONG_DEO["asac"][s] - STRONG_DEO["base"][s] for s in seeds]
    theirs = [PAPER_DEO[s][0] - PAPER_DEO[s][1] for s in seeds]
    differences = [a - b for a, b in zip(mine, theirs)]
    assert strong.difference.n == strong.here.n == strong.there.n == 4
    assert strong.here.estimate == pytest.approx(sum(mine) / 4) and strong.there.estimate == pytest.approx(sum(theirs) / 4)
    assert strong.difference.estimate == pytest.approx(sum(differences) / 4)
    assert strong.difference.half_width == pytest.approx(t_half_width(differences))
    assert strong.verdict == "no detectable difference"  # −0.14, +0.03, −0.18, +0.01
    accuracy = comparisons[2]  # ASAC 1 point above its base in every seed here, level with it there
    assert accuracy.difference.estimate == pytest.approx(1.0) and accuracy.verdict == "higher"

    _, skipped = between(measure(records(), here), here, other_sweep(c1_metric="ACC"))
    assert skipped == ["C1: measures DEO here and ACC in paper_regime (or against another kind of reference); "
                       "not compared"]


def test_the_report_against_another_sweep_writes_its_section_and_csv(tmp_path):
    here = parse_claims("here", section([claim("C1", "DEO", "lower", {"finetune": ASAC}, "base")]))
    paths = write_report(records(), {"g": ["finetune"]}, tmp_path, "Sweep here", here, other_sweep())
    assert tmp_path / "between.csv" in paths
    text = (tmp_path / "report.md").read_text()
    assert "## Between sweeps: this one − paper_regime" in text
    assert text.index("## Claims") < text.index("## Between sweeps") < text.index("## Grid `g`")
    with (tmp_path / "between.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["claim"], r["regime"], r["other_regime"], r["seeds"]) for r in rows] == [
        ("C1", "strong", "paper", "4"), ("C1", "mild", "paper", "4")]
    mild = [MILD_DEO["asac"][s] - MILD_DEO["base"][s] - PAPER_DEO[s][0] + PAPER_DEO[s][1] for s in (1, 2, 3, 4)]
    assert float(rows[1]["estimate"]) == pytest.approx(sum(mild) / 4)


def test_claims_study_resolves_to_its_designed_trials():
    """configs/sweeps/claims.yaml: 26 fine-tuned settings × 5 seeds (the default ASAC trial is shared by five
    grids) plus the 4 rows beside ASAC at the strongest and weakest cue (8 settings), one base per data setting and
    seed (4 × 5), and every claim resolving to one setting per regime."""
    sweep = load_sweep("configs/sweeps/claims.yaml")
    assert len(sweep.trials) == (26 + 4 * 2) * 5
    assert len({t.base_key for t in sweep.trials}) == 4 * 5
    assert [c.id for c in sweep.claims.claims][:2] == ["C1", "C2"] and len(sweep.claims.claims) == 20 + 4 * 3
    for claim in sweep.claims.claims[20:]:  # the new rows: in the strong regime and at the weakest cue
        for regime in ("strong", "beard_0.25"):
            assert sorted(select(sweep.trials, sweep.claims.regimes[regime], claim.treatment, claim.id)) == [0, 1, 2, 3, 4]
    assert sweep.claims.tables == {"main": ["strong", "mild"], "cue": ["strong", "beard_0.5", "beard_0.25"]}


def test_a_subset_of_grids_keeps_their_trials_and_the_claims_they_measure(capsys):
    """--grids cue,cue_mitigations of claims.yaml: the cue axis (3 cue strengths × plain, ASAC) and the rows beside
    ASAC at the strongest and weakest cue (2 × 4), 5 seeds on 3 × 5 bases; only the claims those trials measure
    (those of plain, ASAC and the four rows; not the order, ε, α or attack-model ones), each still one setting per
    regime; a grid the file lacks is one line."""
    from tune.sweep import main

    whole = load_sweep("configs/sweeps/claims.yaml")
    sweep = load_sweep("configs/sweeps/claims.yaml", only=["cue", "cue_mitigations"])
    assert len(sweep.trials) == (3 * 2 + 2 * 4) * 5 and len({t.base_key for t in sweep.trials}) == 3 * 5
    assert {t.base_key for t in sweep.trials} < {t.base_key for t in whole.trials}  # the whole study's bases
    kept = [c.id for c in sweep.claims.claims]
    assert kept == [c.id for c in whole.claims.claims if c.id in kept]
    assert {"C1", "C2", "C5a"} <= set(kept) and {c[:3] for c in kept} >= {"C13", "C14", "C15", "C16"}
    assert {"C3a", "C6a", "C11"} <= {c.id for c in whole.claims.claims} - set(kept)  # claims of grids left out
    with pytest.raises(SystemExit) as stopped:
        main(["--config", "configs/sweeps/claims.yaml", "--grids", "cue,cue_mitigation", "--dry-run"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1
    assert "no grid 'cue_mitigation' (did you mean 'cue_mitigations'?" in err


def test_bound_study_resolves_to_its_designed_trials():
    """configs/sweeps/bound.yaml: 7 rows (plain, ASAC, the oracle and the 4 mitigations beside ASAC) × 2 regimes
    × 5 seeds on 10 bases whose data carry train twins, and each claim's treatment and reference resolving to one
    setting with all five seeds in both regimes."""
    sweep = load_sweep("configs/sweeps/bound.yaml")
    assert len(sweep.trials) == 7 * 2 * 5
    assert len({t.base_key for t in sweep.trials}) == 2 * 5
    assert all(t.axes["data"]["synthetic_train_twins"] for t in sweep.trials)
    assert {t.axes["finetune"]["mode"] for t in sweep.trials} == {
        "plain", "asac", "oracle_counterfactual", "resample", "group_dro", "dfr", "jtt"}
    assert [c.id for c in sweep.claims.claims] == ["B1", "B2", "B3", "B4", "B5", "B6"] + [
        f"M{m}{letter}" for m in range(1, 5) for letter in "abcdefg"]
    assert sweep.claims.tables == {"bound": ["strong", "mild"]}
    for claim in sweep.claims.claims:
        for regime in sweep.claims.regimes.values():
            selectors = [claim.treatment] + [claim.reference] * isinstance(claim.reference, dict)
            for selector in selectors:
                assert sorted(select(sweep.trials, regime, selector, claim.id)) == [0, 1, 2, 3, 4]


def test_paper_regime_study_resolves_to_its_designed_trials():
    """configs/sweeps/paper_regime.yaml: 6 rows on the default base and ASAC on an independent C, × the seeds in
    the file, on 2 bases per seed (the default and the independent C's), and every claim resolving to one setting
    with every seed."""
    sweep = load_sweep("configs/sweeps/paper_regime.yaml")
    seeds = sorted({t.axes["seed"] for t in sweep.trials})
    assert seeds == list(range(30))  # the pilot's power calculation, written into the file before the main run
    assert len(sweep.trials) == 7 * len(seeds) and len({t.base_key for t in sweep.trials}) == 2 * len(seeds)
    assert [c.id for c in sweep.claims.claims][0] == "P0"  # the positive control first
    assert {c.id: c.effect for c in sweep.claims.claims if c.effect is not None} == {
        "C1": -0.038, "C2": 7.62, "C5a": -0.038}
    for claim in sweep.claims.claims:
        for regime in sweep.claims.regimes.values():
            selectors = [claim.treatment] + [claim.reference] * isinstance(claim.reference, dict)
            for selector in selectors:
                assert sorted(select(sweep.trials, regime, selector, claim.id)) == seeds



def test_feature_rich_study_resolves_to_its_designed_trials():
    """configs/sweeps/feature_rich.yaml: 3 rows on the probe's base and ASAC on an independent C, × the paper regime's
    30 seeds, on 2 bases per seed that share one stage-1 M and all share one stage 0 (its own seed); every claim
    resolving to one setting with every seed."""
    sweep = load_sweep("configs/sweeps/feature_rich.yaml")
    seeds = sorted({t.axes["seed"] for t in sweep.trials})
    assert seeds == sorted({t.axes["seed"] for t in load_sweep("configs/sweeps/paper_regime.yaml").trials})
    assert len(sweep.trials) == 4 * len(seeds) and len({t.base_key for t in sweep.trials}) == 2 * len(seeds)
    configs = [load_config(sweep.base_config, t.overrides) for t in sweep.trials]
    assert all(c.pretrain.epochs == 15 and c.base.backbone_lr_scale == 0 for c in configs)
    assert len({base_key(c, "pretrain") for c in configs}) == 1 and len({base_key(c, "base") for c in configs}) == 30
    assert [c.id for c in sweep.claims.claims] == ["P0", "C1", "C2", "C5a", "C5b", "M1", "M2"]
    for claim in sweep.claims.claims:
        for regime in sweep.claims.regimes.values():
            selectors = [claim.treatment] + [claim.reference] * isinstance(claim.reference, dict)
            for selector in selectors:
                assert sorted(select(sweep.trials, regime, selector, claim.id)) == seeds

def test_c10_rerun_resolves_to_the_claims_studys_bases_and_asac_trials():
    """configs/sweeps/claims_c10.yaml: the claims study's bases (same data, config and seeds: the same base keys)
    and its default ASAC trial in both regimes, nothing else."""
    c10, claims = load_sweep("configs/sweeps/claims_c10.yaml"), load_sweep("configs/sweeps/claims.yaml")
    assert len(c10.trials) == 2 * 5 and {t.base_key for t in c10.trials} <= {t.base_key for t in claims.trials}
    assert [c.id for c in c10.claims.claims] == ["C10a", "C10b", "C10c"]


def test_against_needs_report_and_claims_on_both_sides(tmp_path, capsys):
    """`--against` alone is a usage error; against a sweep folder whose file has no claims, one line and exit 2,
    and the report folder of the sweep given to --report is not created."""
    from tune.records import write_json, write_record
    from tune.sweep import main

    folders = {}
    for name, claims in (("with", section([claim("C1", "DEO", "lower", {"finetune": ASAC}, "base")])), ("without", None)):
        folder, trials = tmp_path / name, []
        for r in records()[:2]:
            write_record(folder / "trials" / f"{r.name}-{r.model}", r)
            trials.append({"name": f"{r.name}-{r.model}", "overrides": [], "axes": r.axes, "grids": ["g"]})
        write_json(folder / "sweep.json", {"name": name, "grids": {"g": ["finetune"]}, "trials": trials,
                                           "tracking_uri": f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}",
                                           "parent_run_id": "0123456789abcdef", "claims": claims})
        folders[name] = str(folder)
    with pytest.raises(SystemExit) as exited:
        main(["--against", folders["without"]])
    assert exited.value.code == 2 and "give --report <folder> too" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["--report", folders["with"], "--against", folders["without"]])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1
    assert f"--against: {folders['without']} has no claims section" in err
    other_grids = tmp_path / "other_grids"
    other_grids.mkdir()
    (other_grids / "sweep.json").write_text((tmp_path / "with" / "sweep.json").read_text().replace('"g"', '"h"'))
    with pytest.raises(SystemExit) as exited:
        main(["--report", folders["with"], "--against", folders["with"], str(other_grids)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and f"--against: {other_grids} has other grids than {folders['with']}" in err
    assert not (tmp_path / "with" / "report").exists()
