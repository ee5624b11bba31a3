"""Sweep building blocks that need no trial: overrides, GPUs, search spaces,
the pruning pointer, and the console script's config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stages import sweeping
from stages.pruning import parse_pointer


def test_stage_overrides_drop_sweep_settings() -> None:
    overrides = [
        "train.learning_rate=0.1",
        "+sweep=lr_search",
        "sweep.gpus=[0]",
        "hydra.launcher.n_jobs=2",
        "model=cnn",
    ]
    assert sweeping.stage_overrides(overrides) == [
        "train.learning_rate=0.1",
        "model=cnn",
    ]


@pytest.mark.parametrize(
    ("job", "gpus", "expected"),
    [
        (0, ["0", "1"], "0"),
        (1, ["0", "1"], "1"),
        (2, ["0", "1"], "0"),
        (3, ["5"], "5"),
        (0, [], None),
    ],
)
def test_assign_gpu_round_robin(job: int, gpus: list[str], expected) -> None:
    assert sweeping.assign_gpu(job, gpus) == expected


def test_detect_gpus_from_visible_devices(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert sweeping.detect_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert sweeping.detect_gpus() == []


def test_trial_env_sets_gpu_and_ids() -> None:
    env = sweeping.trial_env("parent1", "trial1", "1", "a|b|3|val_loss")
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env[sweeping.PARENT_ENV] == "parent1"
    assert env[sweeping.TRIAL_KEY_ENV] == "trial1"
    assert env[sweeping.OPTUNA_TRIAL_ENV] == "a|b|3|val_loss"


def test_parse_pointer_rejects_bad_value() -> None:
    assert parse_pointer("/x.journal|s|7|val_accuracy") == (
        "/x.journal",
        "s",
        7,
        "val_accuracy",
    )
    with pytest.raises(ValueError, match="SWEEP_OPTUNA_TRIAL"):
        parse_pointer("/x.journal|s|seven|val_accuracy")


def test_search_space_from_hydra_grammar() -> None:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    from hydra_plugins.pipeline_sweepers.optuna_journal import search_space

    space = search_space(
        {
            "a": "tag(log, interval(1e-4, 1e-1))",
            "b": "interval(0.0, 0.5)",
            "c": "choice(cnn_small, cnn)",
            "d": "tag(int, interval(1, 8))",
            "e": "range(1, 4)",
            "f": "choice([16], [16, 32])",
        }
    )
    assert space["a"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert space["b"] == FloatDistribution(0.0, 0.5)
    assert space["c"] == CategoricalDistribution(["cnn_small", "cnn"])
    assert space["d"] == IntDistribution(1, 8)
    assert space["e"] == CategoricalDistribution(["1", "2", "3"])
    assert space["f"] == CategoricalDistribution(["[16]", "[16, 32]"])
    with pytest.raises(ValueError, match="not a search range"):
        search_space({"g": "0.1"})


def test_console_script_finds_config(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "image-sweep"
    result = subprocess.run(
        [str(script), "--cfg", "job"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "metric: val_accuracy" in result.stdout
