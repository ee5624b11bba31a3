"""Data feeding and per-epoch logging for Keras training and evaluation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from stages.cli import InputError
from stages.shards import load_images

log = logging.getLogger(__name__)

# Keras history names mapped to the pipeline's metric names.
METRIC_NAMES = {
    "loss": "train_loss",
    "accuracy": "train_accuracy",
    "val_loss": "val_loss",
    "val_accuracy": "val_accuracy",
    "learning_rate": "learning_rate",
}


def read_manifest(split_dir: Path, name: str) -> pd.DataFrame:
    """Read one split manifest written by the split stage."""
    path = split_dir / f"{name}.csv"
    if not path.is_file():
        raise InputError(f"{path} not found; run the split stage first")
    return pd.read_csv(path, dtype={"label": str, "sha256": str}, keep_default_na=False)


def read_classes(processed_dir: Path) -> list[str]:
    """Read the class names in class-index order."""
    path = processed_dir / "classes.json"
    if not path.is_file():
        raise InputError(f"{path} not found; run the preprocess stage first")
    return json.loads(path.read_text(encoding="utf-8"))


def load_split(
    processed_dir: Path, split_dir: Path, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Return the images (N, H, W, C uint8) and class indices of one split."""
    rows = read_manifest(split_dir, name)
    images = load_images(processed_dir, rows)
    labels = rows["class_index"].to_numpy(dtype=np.int32)
    return images, labels


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    shuffle_buffer: int = 10_000,
):
    """Build a batched, prefetched tf.data pipeline over in-memory arrays.

    Only the training set is shuffled, so predictions over the others keep
    the manifest order and line up with their labels.
    """
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    if shuffle:
        buffer = min(shuffle_buffer, len(images))
        dataset = dataset.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def epoch_logger(history: list[dict[str, float]]):
    """Return a Keras callback that logs each epoch's metrics to MLflow.

    Each epoch's values are also appended to `history` under the pipeline's
    metric names, with the 1-based epoch number, which is the MLflow step.
    """
    import keras
    import mlflow

    from stages.tracking import finite_metrics

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            values = {METRIC_NAMES.get(k, k): float(v) for k, v in (logs or {}).items()}
            if "learning_rate" not in values:
                values["learning_rate"] = float(self.model.optimizer.learning_rate)
            history.append({"epoch": epoch + 1, **values})
            mlflow.log_metrics(finite_metrics(values), step=epoch + 1)

    return EpochLogger()
