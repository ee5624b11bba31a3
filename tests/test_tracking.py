"""MLflow helpers: store location, parameter flattening, key safety, run status."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from stages import tracking
from stages.config import TrackingConfig


def test_tracking_uri_default_at_project_root(project: Path) -> None:
    assert tracking.tracking_uri(TrackingConfig()) == f"sqlite:///{project}/mlflow.db"


def test_tracking_uri_uses_dvc_root(project: Path, tmp_path: Path, monkeypatch) -> None:
    copy = project / ".dvc" / "tmp" / "exps" / "tmp123"
    (copy / "conf").mkdir(parents=True)
    (copy / "conf" / "config.yaml").write_text("defaults: []\n")
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(project))
    assert tracking.tracking_uri(TrackingConfig()) == f"sqlite:///{project}/mlflow.db"


def test_tracking_uri_precedence(project: Path, monkeypatch) -> None:
    cfg = TrackingConfig(uri="http://127.0.0.1:5999")
    assert tracking.tracking_uri(cfg) == "http://127.0.0.1:5999"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/other.db")
    assert tracking.tracking_uri(cfg) == "sqlite:////tmp/other.db"


def test_flatten_nested_sections() -> None:
    flat = tracking.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None})
    assert flat == {"a.b": "1", "a.c.d": "[1, 2]", "e": "null"}


def test_shorten_values_marks_long_values() -> None:
    short = tracking.shorten_values({"k": "x" * (MAX_PARAM_VAL_LENGTH + 10), "s": "ok"})
    assert len(short["k"]) == MAX_PARAM_VAL_LENGTH
    assert short["k"].endswith(tracking.TRUNCATION_MARK)
    assert short["s"] == "ok"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("test_f1.dog@home", "test_f1.dog_home"),
        ("a,b", "a_b"),
        ("crème", "cr_me"),
        ("x [1]", "x _1_"),
        ("ok-name/1.2", "ok-name/1.2"),
    ],
)
def test_sanitize_key(name: str, expected: str) -> None:
    assert tracking.sanitize_key(name) == expected


def test_finite_metrics_drops_nan() -> None:
    kept = tracking.finite_metrics({"a": 1.0, "b": float("nan"), "c": float("inf")})
    assert kept == {"a": 1.0}


def test_run_status_marks_failed(project: Path) -> None:
    tracking.use_experiment(TrackingConfig(experiment_name="status"))
    run = mlflow.start_run()
    with pytest.raises(ValueError, match="boom"):
        with tracking.run_status(run.info.run_id):
            raise ValueError("boom")
    stored = MlflowClient().get_run(run.info.run_id)
    assert stored.info.status == "FAILED"
    assert stored.data.tags["error"] == "ValueError: boom"
    assert mlflow.active_run() is None


def test_run_status_marks_killed(project: Path) -> None:
    tracking.use_experiment(TrackingConfig(experiment_name="status"))
    run = mlflow.start_run()
    with pytest.raises(KeyboardInterrupt):
        with tracking.run_status(run.info.run_id):
            raise KeyboardInterrupt
    assert MlflowClient().get_run(run.info.run_id).info.status == "KILLED"


def test_default_store_puts_artifacts_at_root(project: Path) -> None:
    experiment_id = tracking.use_experiment(TrackingConfig(experiment_name="where"))
    location = mlflow.get_experiment(experiment_id).artifact_location
    assert location == (project / "mlartifacts").as_uri()
