"""Each benchmark runs end to end at its --smoke size and writes its JSON. Nothing here asserts a timing:
the numbers belong in the README's Performance section, measured on a quiet machine, not in a test on a shared one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, name: str, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--smoke", "--json", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["machine"]["usable_cores"] >= 1
    return payload


def test_bench_attacks_checks_fgsm_equality(tmp_path):
    pytest.importorskip("torchattacks")
    (result,) = _run(tmp_path, "bench_attacks", "--backbones", "small_cnn")["results"]
    assert all(result["checks"]["fgsm_equal"])  # the benchmark compares the same work
    assert all(result["checks"]["pgd_in_ball_ours"]) and all(result["checks"]["pgd_in_ball_torchattacks"])
    assert set(result["attacks"]) == {"fgsm", "pgd"}


def test_bench_step_reports_ratios_and_profile(tmp_path):
    variants = ["channels_last_flipped", "bf16_autocast"]
    (result,) = _run(tmp_path, "bench_step", "--backbones", "small_cnn", "--variants", *variants)["results"]
    assert result["checks"]["eval_rel_diff_vs_formula"] <= 1e-5
    assert {"asac_over_plain", "asac_over_bound"} <= set(result)
    assert len(result["last_chunk_sizes"]) == 3  # |E| chunk steps
    assert "step.backward" in result["profile"]["phases_ms"]
    assert set(result["variants"]) == {"default", *variants}
    assert all(v["over_bound"] > 0 for v in result["variants"].values())  # each against the bound of its own rounds


@pytest.mark.slow  # ~7 s: the pipeline and comparison tests run the same end-to-end path in the default run
def test_bench_e2e_times_both_modes(tmp_path):
    result = _run(tmp_path, "bench_e2e")["results"]
    assert set(result["images_per_s"]) == {"plain", "asac"}
    assert result["asac_time_over_plain"] > 0


@pytest.mark.slow  # ~10 s: tests/test_distributed.py launches two gloo processes in the default run
def test_bench_distributed_runs_two_synchronised_processes(tmp_path):
    fixed_global, per_rank = _run(tmp_path, "bench_distributed")["results"]
    assert (fixed_global["mode"], per_rank["mode"]) == ("global", "per_rank")
    for result in (fixed_global, per_rank):
        assert result["runs"]["2x1"]["world_size"] == 2 and result["runs"]["2x1"]["distributed_type"] == "MULTI_CPU"
        assert result["runs"]["1x1"]["world_size"] == 1
    # --smoke: G = 8. A fixed global batch splits it; a fixed per-rank batch doubles it on two ranks.
    assert [fixed_global["runs"][r]["local_batch"] for r in ("1x1", "2x1")] == [8, 4]
    assert [per_rank["runs"][r]["global_batch"] for r in ("1x1", "2x1")] == [8, 16]
    assert fixed_global["runs"]["2x1"]["sync_batchnorm"] and not per_rank["runs"]["2x1"]["sync_batchnorm"]


@pytest.mark.slow  # ~14 s: two child processes, each generating and loading its dataset
def test_bench_memory_runs_each_size_in_its_own_process(tmp_path):
    result = _run(tmp_path, "bench_memory")["results"]
    assert [r["num_images"] for r in result["runs"]] == [200, 400]
    assert all(r["peak_rss_mib"] > 0 for r in result["runs"])


@pytest.mark.slow
def test_bench_layout_times_both_layouts(tmp_path):
    result = _run(tmp_path, "bench_layout")["results"]
    assert [len(result["seconds"][layout]) for layout in ("sequential", "parallel")] == [1, 1]
    assert result["speedup_parallel_over_sequential"] > 0


@pytest.mark.slow
def test_bench_layout_times_a_sweep_both_ways(tmp_path):
    result = _run(tmp_path, "bench_layout", "--sweep", "configs/sweeps/smoke.yaml")["results"]
    assert result["config"] == "configs/sweeps/smoke.yaml"
    assert [len(result["seconds"][layout]) for layout in ("sequential", "parallel")] == [1, 1]


@pytest.mark.slow
def test_bench_layout_packs_a_sweeps_trials_per_device(tmp_path):
    """--per-device: each count runs the sweep's 6 trials with 1/N of the device (and of the cores) per trial."""
    result = _run(tmp_path, "bench_layout", "--sweep", "configs/sweeps/smoke.yaml", "--per-device", "1", "2",
                  "--processes", "2")["results"]
    assert result["trials"] == 6 and list(result["seconds"]) == ["1_per_device", "2_per_device"]
    assert {n: r["cpu"] for n, r in result["resources"].items()} == {"1_per_device": 2.0, "2_per_device": 1.0}
    assert all(v > 0 for v in result["trials_per_hour"].values())


@pytest.mark.slow
def test_profile_row_splits_a_pgd_epoch_into_phases(tmp_path):
    result = _run(tmp_path, "profile_row")["results"]
    assert result["row"] == "asac_pgd" and result["phases_ms"]["asac.attack"] > 0
    assert "evaluation (valid, test)" in result["phases_ms"] and result["operators"]
