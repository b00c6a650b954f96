"""Many trials per GPU: a sweep's `resources.gpu` may be a fraction of one GPU, which each trial reserves from Ray
as written; a count that no device can hold is one error line before Ray starts."""

from __future__ import annotations

import pytest

from tune.spec import load_sweep
from tune.sweep import main
from tune.trials import trial_resources

from .test_sweep import _write_sweep


@pytest.mark.parametrize("gpu, reserved", [(0.125, {"CPU": 1.0, "GPU": 0.125}), (1, {"CPU": 1.0, "GPU": 1.0}),
                                           (0, {"CPU": 1.0})])
def test_each_trial_reserves_the_resources_as_written(tmp_path, gpu, reserved):
    path = _write_sweep(tmp_path, "packed", {"g": {"order": ["ascending", "random"]}}, resources={"cpu": 1, "gpu": gpu})
    assert trial_resources(load_sweep(path).resources).required_resources == reserved


@pytest.mark.parametrize("gpu", [1.5, -0.125, float("nan")])
def test_a_gpu_count_no_device_holds_is_one_error_line(tmp_path, capsys, gpu):
    path = _write_sweep(tmp_path, "bad", {"g": {"order": ["ascending"]}}, resources={"cpu": 1, "gpu": gpu})
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(path), "--dry-run"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "a fraction of one GPU up to 1" in err and f"got gpu: {gpu!r}" in err
