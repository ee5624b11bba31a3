"""Stage train: a real Keras fit on the digits, tracked in a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from stages.train import train
from tests.conftest import client_for


def test_train_returns_metrics_and_run(trained) -> None:
    project, metrics = trained
    assert metrics["epochs"] == 2
    assert 0.5 < metrics["val_accuracy"] <= 1.0
    assert len(metrics["mlflow_run_id"]) == 32
    assert (project / "models/model.keras").stat().st_size > 10_000
    history = pd.read_csv(project / "metrics/history.csv")
    assert history["epoch"].tolist() == [1, 2]
    for column in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert history[column].notna().all(), column
    assert history["learning_rate"].tolist() == pytest.approx([0.001, 0.001])


def test_train_logs_params_and_tags(trained) -> None:
    project, metrics = trained
    run = client_for(project).get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.epochs"] == "2"
    assert params["model.name"] == "cnn_small"
    assert params["model.filters"] == "[16]"
    assert params["preprocess.image_size"] == "[16, 16]"
    assert params["split.seed"] == "42"
    assert run.data.tags["dataset"] == "digits"
    assert run.data.tags["num_classes"] == "10"
    assert run.data.tags["device"] == "CPU"


def test_train_logs_epoch_metrics(trained) -> None:
    project, metrics = trained
    client = client_for(project)
    for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        steps = [
            m.step for m in client.get_metric_history(metrics["mlflow_run_id"], name)
        ]
        assert steps == [1, 2], name


def test_train_model_loads_with_pyfunc(trained, monkeypatch) -> None:
    project, metrics = trained
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"runs:/{metrics['mlflow_run_id']}/model")
    images = np.load(project / "data/processed/images-00000.npy")[:4]
    probabilities = np.asarray(model.predict(images))
    assert probabilities.shape == (4, 10)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)


def test_train_missing_split(project: Path) -> None:
    from stages.cli import InputError

    with pytest.raises(InputError, match="run the preprocess stage first"):
        train([])


def test_train_invalid_config_fails_before_loading(project: Path) -> None:
    from stages.config import ConfigError

    with pytest.raises(ConfigError, match="train.learning_rate"):
        train(["train.learning_rate=-1"])
