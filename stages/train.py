"""Stage train: fit the configured Keras model and track it in MLflow.

Reads params: model, train, tracking, dataset.name. Reads: data/processed/,
data/split/. Writes: models/model.keras, metrics/train.json (final metrics and
the MLflow run id) and metrics/history.csv (one row per epoch).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd

from stages.cli import InputError, run_stage
from stages.config import Params, load_params
from stages.fsutil import atomic_file, write_json

log = logging.getLogger("stages.train")

PROCESSED_DIR = Path("data/processed")
SPLIT_DIR = Path("data/split")
MODEL_FILE = Path("models/model.keras")
METRICS_FILE = Path("metrics/train.json")
HISTORY_FILE = Path("metrics/history.csv")


def _start_run(params: Params, num_classes: int):
    import tensorflow as tf

    from stages import tracking
    from stages.devices import describe_devices, visible_gpus

    device = describe_devices(visible_gpus())
    tags = {
        "num_classes": str(num_classes),
        "device": device,
        "tensorflow_version": tf.__version__,
    }
    run = tracking.start_training_run(params.raw, params.tracking, tags)
    log.info("MLflow run %s; training on %s", run.info.run_id, device)
    return run


def fit(params: Params, data: dict, num_classes: int, outputs: dict[str, Path]) -> dict:
    """Build, fit and save the model inside the current MLflow run."""
    import keras

    from stages.models import build_cnn, compile_model
    from stages.training import epoch_logger, make_dataset

    cfg = params.train
    keras.utils.set_random_seed(cfg.seed)
    x_train, y_train = data["train"]
    x_val, y_val = data["val"]
    model = build_cnn(x_train.shape[1:], num_classes, params.model)
    compile_model(model, cfg)
    log.info("Model '%s' with %d parameters", model.name, model.count_params())

    train_ds = make_dataset(
        x_train,
        y_train,
        cfg.batch_size,
        shuffle=True,
        seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer,
    )
    val_ds = make_dataset(x_val, y_val, cfg.batch_size) if len(x_val) else None
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=cfg.epochs,
        callbacks=[epoch_logger(history)],
        shuffle=False,
        verbose=2,
    )
    seconds = time.perf_counter() - started

    with atomic_file(outputs["model"]) as tmp:
        model.save(tmp)
    if params.tracking.log_model:
        from stages.tracking import log_keras_model

        log_keras_model(model, x_train[:2])
    with atomic_file(outputs["history"]) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)
    final = {k: v for k, v in history[-1].items() if k != "epoch"}
    return {**final, "epochs": len(history), "train_seconds": round(seconds, 2)}


def train(
    overrides: list[str],
    processed_dir: Path = PROCESSED_DIR,
    split_dir: Path = SPLIT_DIR,
    outputs: dict[str, Path] | None = None,
) -> dict:
    """Train on the train split, validate on val, and return the final metrics."""
    outputs = outputs or {
        "model": MODEL_FILE,
        "metrics": METRICS_FILE,
        "history": HISTORY_FILE,
    }
    params = load_params(["model", "train", "tracking"], overrides)
    from stages.training import load_split, read_classes

    classes = read_classes(processed_dir)
    data = {
        name: load_split(processed_dir, split_dir, name) for name in ("train", "val")
    }
    if len(data["train"][0]) == 0:
        raise InputError(f"{split_dir / 'train.csv'} is empty; raise split.train")
    log.info(
        "Loaded %d train and %d val images of shape %s, %d classes",
        len(data["train"][0]),
        len(data["val"][0]),
        data["train"][0].shape[1:],
        len(classes),
    )

    import mlflow

    from stages.tracking import run_status

    run = _start_run(params, len(classes))
    with run_status(run.info.run_id):
        metrics = fit(params, data, len(classes), outputs)
        metrics["mlflow_run_id"] = run.info.run_id
        metrics["mlflow_experiment_id"] = run.info.experiment_id
        mlflow.log_metric("train_seconds", metrics["train_seconds"])
        write_json(outputs["metrics"], metrics)
    log.info(
        "Saved %s; val_accuracy %.4f",
        outputs["model"],
        metrics.get("val_accuracy", float("nan")),
    )
    return metrics


if __name__ == "__main__":
    run_stage(train, __doc__)
