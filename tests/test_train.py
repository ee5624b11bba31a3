"""Stage train: a real Keras fit on the digits, tracked in a real MLflow store."""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest

from stages.config import SECTIONS, ConfigError, read_params_file, validate
from stages.devices import cpu_flags
from stages.hardware import select_precision
from stages.schedules import WarmupStepDecay, build_schedule, learning_rate_at
from stages.train import train
from tests.conftest import ROOT, client_for


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
    # auto: mixed_bfloat16 on CPUs with native bfloat16 arithmetic.
    expected_precision = select_precision("auto", [], cpu_flags())
    assert run.data.tags["precision"] == expected_precision
    assert run.data.tags["strategy"] == "default"
    assert run.data.tags["num_replicas"] == "1"


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


def test_train_model_has_input_example(trained) -> None:
    from mlflow.models import Model

    project, metrics = trained
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    uri = f"runs:/{metrics['mlflow_run_id']}/model"
    example = Model.load(uri).load_input_example(uri)
    assert example.shape == (2, 16, 16, 1)
    assert example.dtype == np.uint8
    probabilities = np.asarray(mlflow.pyfunc.load_model(uri).predict(example))
    assert probabilities.shape == (2, 10)


def test_train_model_serving_example_predicts(trained, tmp_path: Path) -> None:
    from mlflow.models import Model

    project, metrics = trained
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    uri = f"runs:/{metrics['mlflow_run_id']}/model"
    local = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "model"))
    serving_input = Model.load(local).get_serving_input(local)
    assert serving_input is not None
    payload = tmp_path / "request.json"
    payload.write_text(serving_input)
    output = tmp_path / "predictions.json"
    mlflow.models.predict(
        model_uri=uri,
        input_path=str(payload),
        content_type="json",
        output_path=str(output),
        env_manager="local",
    )
    predictions = json.loads(output.read_text())["predictions"]
    assert np.asarray(predictions).shape == (2, 10)


def test_train_missing_split(project: Path) -> None:
    from stages.cli import InputError

    with pytest.raises(InputError, match="run the preprocess stage first"):
        train([])


def test_train_invalid_config_fails_before_loading(project: Path) -> None:
    from stages.config import ConfigError

    with pytest.raises(ConfigError, match="train.learning_rate"):
        train(["train.learning_rate=-1"])


def subset(project: Path, target: Path, train_rows: int, val_rows: int) -> dict:
    """Write manifests with the first rows of train and val and 16 test rows,
    and return the paths to pass to train()."""
    split_dir = target / "split"
    split_dir.mkdir(parents=True)
    for name, count in (("train", train_rows), ("val", val_rows), ("test", 16)):
        lines = (project / "data/split" / f"{name}.csv").read_text().splitlines()
        (split_dir / f"{name}.csv").write_text("\n".join(lines[: count + 1]) + "\n")
    outputs = {
        "model": target / "model.keras",
        "predictions": target / "test_predictions.npz",
        "metrics": target / "train.json",
        "history": target / "history.csv",
        "checkpoints": target / "checkpoints",
    }
    return {
        "processed_dir": project / "data/processed",
        "split_dir": split_dir,
        "outputs": outputs,
    }


QUICK = ["model=cnn_small", "train.batch_size=32", "tracking.log_model=false"]


def test_train_cache_keeps_results(
    digits_project: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    monkeypatch.chdir(digits_project)
    caplog.set_level(logging.INFO, logger="stages.train")
    overrides = [*QUICK, "train.epochs=2", "train.deterministic=true", "augment=basic"]
    first = train(overrides, **subset(digits_project, tmp_path / "a", 256, 64))
    assert "of train and val pixels into memory" in caplog.text
    streamed = [*overrides, "train.cache_mb=0"]
    second = train(streamed, **subset(digits_project, tmp_path / "b", 256, 64))
    assert "train and val pixels from the shards, as train.cache_mb=0" in caplog.text
    assert first["mlflow_run_id"] != second["mlflow_run_id"]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert first[key] == second[key], key
    histories = [pd.read_csv(tmp_path / name / "history.csv") for name in "ab"]
    pd.testing.assert_frame_equal(*histories)


def test_train_without_val_images_logs_no_val_metrics(
    digits_project: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    monkeypatch.chdir(digits_project)
    paths = subset(digits_project, tmp_path, 128, 0)
    metrics = train([*QUICK, "train.epochs=1"], **paths)
    assert "training without validation" in caplog.text
    assert not [key for key in metrics if key.startswith("val_")]
    assert all(np.isfinite(v) for v in metrics.values() if isinstance(v, float))
    history = pd.read_csv(paths["outputs"]["history"])
    assert not [column for column in history if column.startswith("val_")]
    logged = client_for(digits_project).get_run(metrics["mlflow_run_id"]).data
    assert "train_accuracy" in logged.metrics
    assert not [key for key in logged.metrics if key.startswith("val_")]
    assert not [tag for tag in logged.tags if tag.startswith("nonfinite.")]


def test_train_schedule_and_loss_options(
    digits_project: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(digits_project)
    paths = subset(digits_project, tmp_path, 256, 64)
    metrics = train(
        [
            *QUICK,
            "train.epochs=3",
            "train.optimizer=sgd",
            "train.nesterov=true",
            "train.learning_rate=0.05",
            "train.lr_schedule=step",
            "train.warmup_epochs=1",
            "train.decay_epochs=1",
            "train.decay_rate=0.5",
            "train.label_smoothing=0.1",
            "train.class_weight=balanced",
            "train.clipnorm=1.0",
        ],
        **paths,
    )
    steps = math.ceil(256 / 32)
    # Each epoch logs the rate of its last step: warm-up, then halving.
    expected = [0.05 * (steps - 1) / steps, 0.05, 0.025]
    history = pd.read_csv(paths["outputs"]["history"])
    assert history["learning_rate"].tolist() == pytest.approx(expected)
    logged = client_for(digits_project).get_metric_history(
        metrics["mlflow_run_id"], "learning_rate"
    )
    assert [m.value for m in logged] == pytest.approx(expected)
    assert metrics["epochs"] == 3
    assert np.isfinite(metrics["train_loss"])


def test_train_early_stopping_keeps_best_epoch(
    digits_project: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(digits_project)
    paths = subset(digits_project, tmp_path, 256, 64)
    # With min_delta 10 no epoch after the first counts as an improvement.
    metrics = train(
        [
            *QUICK,
            "train.epochs=5",
            "train.optimizer=adamw",
            "train.jit_compile=true",
            "train.early_stopping.enabled=true",
            "train.early_stopping.monitor=val_loss",
            "train.early_stopping.patience=1",
            "train.early_stopping.min_delta=10",
        ],
        **paths,
    )
    history = pd.read_csv(paths["outputs"]["history"])
    assert history["epoch"].tolist() == [1, 2]
    assert metrics["epochs"] == 2
    assert metrics["best_epoch"] == 1
    assert metrics["val_loss"] == pytest.approx(history["val_loss"][0])


def test_train_fine_tunes_backbone_in_two_phases(
    digits_project: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(digits_project)
    backbone = keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(32, 32, 3), alpha=0.35
    )
    weights = tmp_path / "mobilenet_v2.weights.h5"
    backbone.save_weights(weights)
    paths = subset(digits_project, tmp_path, 128, 16)
    metrics = train(
        [
            "model=mobilenet_v2",
            "model.alpha=0.35",
            "model.input_size=[32,32]",
            f"model.weights={weights}",
            "model.fine_tune.layers=10",
            "model.fine_tune.epochs=1",
            "model.fine_tune.learning_rate=0.0001",
            "train.epochs=1",
            "train.batch_size=64",
            "tracking.log_model=false",
        ],
        **paths,
    )
    history = pd.read_csv(paths["outputs"]["history"])
    assert history["epoch"].tolist() == [1, 2]
    assert history["learning_rate"].tolist() == pytest.approx([0.001, 0.0001])
    steps = client_for(digits_project).get_metric_history(
        metrics["mlflow_run_id"], "train_loss"
    )
    assert [m.step for m in steps] == [1, 2]
    saved = keras.models.load_model(paths["outputs"]["model"])
    assert saved.predict(np.zeros((1, 16, 16, 1), "uint8"), verbose=0).shape == (1, 10)


def test_train_schedules_rates() -> None:
    step = WarmupStepDecay(0.1, warmup_steps=4, decay_steps=10, decay_rate=0.5)
    rates = [learning_rate_at(step, s) for s in (0, 2, 4, 13, 14, 24)]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.1, 0.05, 0.025])
    assert WarmupStepDecay(**step.get_config()).get_config() == step.get_config()

    params = read_params_file(ROOT / "params.yaml")
    params["train"].update(lr_schedule="cosine", warmup_epochs=1, epochs=3)
    cfg = validate(params, ["train"], "params.yaml").train
    cosine = build_schedule(cfg, steps_per_epoch=10)
    assert learning_rate_at(cosine, 0) == pytest.approx(0.0)
    assert learning_rate_at(cosine, 10) == pytest.approx(cfg.learning_rate)
    assert learning_rate_at(cosine, 20) == pytest.approx(cfg.learning_rate / 2)
    assert learning_rate_at(cosine, 30) == pytest.approx(0.0, abs=1e-9)
    params["train"].update(lr_schedule="constant", warmup_epochs=0)
    constant = validate(params, ["train"], "params.yaml").train
    assert build_schedule(constant, steps_per_epoch=10) == constant.learning_rate


@pytest.mark.parametrize(
    ("section", "values", "expected"),
    [
        ("train", {"warmup_epochs": 20}, "must be less than train.epochs (20)"),
        ("train", {"optimizer": "rmsprop"}, "one of 'adam', 'sgd', 'adamw'"),
        ("train", {"lr_schedule": "linear"}, "one of 'constant', 'step', 'cosine'"),
        ("train", {"clipnorm": 0}, "train.clipnorm: invalid value 0"),
        ("train", {"precision": "float16"}, "train.precision: invalid value"),
        ("train", {"strategy": "tpu"}, "train.strategy: invalid value"),
        (
            "train",
            {"early_stopping": {"monitor": "val_auc"}},
            "train.early_stopping.monitor: invalid value 'val_auc'",
        ),
        (
            "train",
            {"early_stopping": {"patience": 0}},
            "train.early_stopping.patience: invalid value 0",
        ),
        ("augment", {"rotation": 0.7}, "augment.rotation: invalid value 0.7"),
        ("augment", {"flip": "diagonal"}, "augment.flip: invalid value"),
    ],
)
def test_train_config_rejects(section: str, values: dict, expected: str) -> None:
    params = copy.deepcopy(read_params_file(ROOT / "params.yaml"))
    params[section].update(values)
    with pytest.raises(ConfigError) as error:
        validate(params, list(SECTIONS), "params.yaml")
    assert expected in str(error.value)
