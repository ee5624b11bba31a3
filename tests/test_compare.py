"""Command image-compare: runs logged to a real MLflow store, listed and plotted."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from stages.cli import InputError
from stages.compare import (
    DEFAULT_METRICS,
    DEFAULT_PARAMS,
    RUN_COLUMNS,
    compare_runs,
    main,
    needs_log_scale,
)
from tests.conftest import client_for, copy_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# name, model, learning rate, batch size, test_accuracy, val_accuracy, val_loss
RUNS = [
    ("slow-lr", "cnn", 0.0001, 32, 0.91, 0.90, 0.35),
    ("base", "cnn", 0.001, 32, 0.97, 0.96, 0.12),
    ("fast-lr", "cnn_small", 0.01, 128, 0.95, 0.94, 0.20),
    ("too-fast", "cnn_large", 0.1, 64, 0.40, 0.42, 1.90),
    ("unevaluated", "cnn_small", 0.001, 32, None, 0.93, 0.25),
]


def log_run(client, experiment_id: str, run: tuple, status: str = "FINISHED") -> str:
    """Log one training run's params and metrics as the train stage names them."""
    from mlflow.entities import Metric, Param

    name, model, learning_rate, batch_size, *metric_values = run
    run_id = client.create_run(experiment_id, run_name=name).info.run_id
    params = {
        "model.name": model,
        "train.optimizer": "adam",
        "train.learning_rate": str(learning_rate),
        "train.batch_size": str(batch_size),
        "train.epochs": "2",
        "tracking.run_name": "null",
    }
    metrics = dict(zip(DEFAULT_METRICS, metric_values, strict=True))
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, 0, 1) for k, v in metrics.items() if v is not None],
        params=[Param(k, v) for k, v in params.items()],
    )
    client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def runs_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose store contains RUNS, an empty and a partial experiment."""
    folder = copy_config(tmp_path_factory.mktemp("compare") / "project")
    client = client_for(folder)
    artifacts = (folder / "mlartifacts").as_uri()
    experiment_id = client.create_experiment("image-classification", artifacts)
    for run in RUNS:
        status = "FAILED" if run[0] == "too-fast" else "FINISHED"
        log_run(client, experiment_id, run, status)
    client.create_experiment("empty", artifacts)
    partial_id = client.create_experiment("partial", artifacts)
    log_run(client, partial_id, ("only-val", "cnn", 0.001, 32, None, 0.8, 0.5))
    log_run(client, partial_id, ("better-val", "cnn", 0.01, 32, None, 0.9, 0.4))
    return folder


@pytest.fixture
def in_runs_project(runs_project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The runs project as the working directory, with its default store."""
    monkeypatch.chdir(runs_project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    return runs_project


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Restore the root logger after a test that runs `main`, which configures it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_compare_default_columns(in_runs_project: Path) -> None:
    table = compare_runs()
    assert list(table.columns) == RUN_COLUMNS + DEFAULT_PARAMS + DEFAULT_METRICS
    assert table["run_name"].tolist() == [
        "base",
        "fast-lr",
        "slow-lr",
        "too-fast",
        "unevaluated",
    ]
    assert math.isnan(table["test_accuracy"].iloc[-1])
    assert table.set_index("run_name").loc["too-fast", "status"] == "FAILED"
    assert table["start_time"].dt.tz is not None
    assert table["train.learning_rate"].dtype == float


def test_compare_sort_ascending_limit(in_runs_project: Path) -> None:
    table = compare_runs(sort="val_loss", ascending=True, limit=2)
    assert table["run_name"].tolist() == ["base", "fast-lr"]
    assert table["val_loss"].tolist() == [0.12, 0.20]


def test_compare_sort_by_numeric_param(in_runs_project: Path) -> None:
    table = compare_runs(sort="train.batch_size", limit=2)
    assert table["train.batch_size"].tolist() == [128, 64]


def test_compare_chosen_columns(in_runs_project: Path) -> None:
    table = compare_runs(params=["model.name"], metrics=["val_loss"])
    assert list(table.columns) == [*RUN_COLUMNS, "model.name", "val_loss"]
    assert table["val_loss"].tolist() == [1.90, 0.35, 0.25, 0.20, 0.12]


def test_compare_default_metric_left_out(in_runs_project: Path) -> None:
    table = compare_runs(experiment="partial")
    assert "test_accuracy" not in table.columns
    assert table["run_name"].tolist() == ["better-val", "only-val"]


def test_compare_csv_output(in_runs_project: Path, tmp_path: Path) -> None:
    output = tmp_path / "runs.csv"
    table = compare_runs(output=output, limit=3)
    written = pd.read_csv(output)
    assert list(written.columns) == list(table.columns)
    assert len(written) == 3
    assert written["run_id"].str.len().tolist() == [32, 32, 32]
    assert written["run_name"].tolist() == ["base", "fast-lr", "slow-lr"]


def test_compare_plot_numeric(in_runs_project: Path, tmp_path: Path) -> None:
    target = tmp_path / "plots/lr.png"
    compare_runs(plot=target, x="train.learning_rate", y="test_accuracy")
    assert target.read_bytes().startswith(PNG_SIGNATURE)
    assert target.stat().st_size > 5000
    assert not list(target.parent.glob(".lr*"))


def test_compare_plot_categorical(in_runs_project: Path, tmp_path: Path) -> None:
    target = tmp_path / "model.png"
    compare_runs(plot=target, x="model.name", y="val_accuracy", limit=4)
    assert target.read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0001, 0.001, 0.1], True),
        ([0.01, 0.05], False),
        ([0.0, 0.1, 1.0], False),
        ([-1.0, 100.0], False),
    ],
)
def test_compare_log_scale(values: list[float], expected: bool) -> None:
    assert needs_log_scale(pd.Series(values)) is expected


def test_compare_cli_prints_table(in_runs_project: Path, root_logging, capsys) -> None:
    main(["--limit", "2", "--params", "model.name", "--metrics", "test_accuracy"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [*RUN_COLUMNS, "model.name", "test_accuracy"]
    assert len(lines) == 3
    assert len(lines[1].split()[0]) == 8
    assert lines[1].split()[1] == "base"
    assert lines[1].split()[-1] == "0.97"


def test_compare_explicit_store_outside_project(
    runs_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    table = compare_runs(
        experiment="partial", tracking_uri=f"sqlite:///{runs_project / 'mlflow.db'}"
    )
    assert len(table) == 2


def test_compare_missing_experiment(in_runs_project: Path) -> None:
    pattern = "'nope' not found.*existing experiments: .*image-classification, partial"
    with pytest.raises(InputError, match=pattern):
        compare_runs(experiment="nope")


def test_compare_missing_metric(in_runs_project: Path) -> None:
    with pytest.raises(InputError, match="metric named 'test_acc'") as error:
        compare_runs(metrics=["test_acc"])
    assert "did you mean 'test_accuracy'" in str(error.value)
    assert "available metrics: test_accuracy, val_accuracy, val_loss" in str(
        error.value
    )


def test_compare_missing_param(in_runs_project: Path) -> None:
    with pytest.raises(InputError, match="param named 'val_loss'") as error:
        compare_runs(params=["val_loss"])
    assert "it is a metric, so pass it to --metrics" in str(error.value)
    assert "available params: model.name, tracking.run_name" in str(error.value)


def test_compare_missing_sort_key(in_runs_project: Path) -> None:
    with pytest.raises(InputError, match="metric or param named 'f1'"):
        compare_runs(sort="f1")


def test_compare_missing_plot_axis(in_runs_project: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="param or metric named 'train.lr'"):
        compare_runs(plot=tmp_path / "x.png", x="train.lr")
    assert not (tmp_path / "x.png").exists()


def test_compare_no_runs(in_runs_project: Path) -> None:
    with pytest.raises(InputError, match="Experiment 'empty' .* has no runs"):
        compare_runs(experiment="empty")


def test_compare_missing_store(in_runs_project: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="MLflow store .*missing.db not found"):
        compare_runs(tracking_uri=f"sqlite:///{tmp_path / 'missing.db'}")
    assert not (tmp_path / "missing.db").exists()


def test_compare_cli_error_exit_code(
    in_runs_project: Path, root_logging, capsys
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--experiment", "nope"])
    assert exit_info.value.code == 2
    assert "Experiment 'nope' not found" in capsys.readouterr().err
