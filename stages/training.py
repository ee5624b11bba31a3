"""Data feeding, callbacks and checkpoints for Keras training and evaluation.

Resuming is exact because each epoch's randomness is derived from
(train.seed, epoch): the shuffle order of the epoch's data, and the state of
every random layer (dropout, augmentation) at the epoch's start. A run
resumed after epoch k therefore replays epochs k+1, ... as an uninterrupted
run would, given the restored weights and optimizer state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.cli import InputError
from stages.config import EarlyStoppingConfig
from stages.fsutil import atomic_dir, remove_stale_tmp, write_json
from stages.shards import ShardedImages

log = logging.getLogger(__name__)

# Keras history names mapped to the pipeline's metric names.
METRIC_NAMES = {
    "loss": "train_loss",
    "accuracy": "train_accuracy",
    "val_loss": "val_loss",
    "val_accuracy": "val_accuracy",
    "learning_rate": "learning_rate",
}
KERAS_NAMES = {name: key for key, name in METRIC_NAMES.items()}
# Keras names the state variable of every SeedGenerator (dropout, random
# augmentation layers) like this.
SEED_STATE_NAME = "seed_generator_state"


# Columns of a split manifest that training and evaluation read.
MANIFEST_COLUMNS = ("file", "label", "class_index", "sha256", "shard", "offset")


def read_manifest(split_dir: Path, name: str) -> pd.DataFrame:
    """Read one split manifest written by the split stage.

    Raises:
        InputError: the file is missing, has no header, lacks a column, or
            has a non-integer class index or shard address.
    """
    path = split_dir / f"{name}.csv"
    if not path.is_file():
        raise InputError(f"{path} not found; run the split stage first")
    rerun = "run the split stage again (dvc repro split)"
    try:
        rows = pd.read_csv(
            path, dtype={"label": str, "sha256": str}, keep_default_na=False
        )
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as error:
        raise InputError(
            f"{path} is not a valid manifest ({error}); {rerun}"
        ) from error
    missing = [column for column in MANIFEST_COLUMNS if column not in rows.columns]
    if missing:
        raise InputError(f"{path} is missing the columns {missing}; {rerun}")
    for column in ("class_index", "shard", "offset"):
        if not pd.api.types.is_integer_dtype(rows[column]) and len(rows):
            raise InputError(
                f"{path}: invalid column {column}, expected integers; {rerun}"
            )
    return rows


def read_classes(processed_dir: Path) -> list[str]:
    """Read the class names in class-index order."""
    path = processed_dir / "classes.json"
    if not path.is_file():
        raise InputError(f"{path} not found; run the preprocess stage first")
    return json.loads(path.read_text(encoding="utf-8"))


def load_split(
    processed_dir: Path, split_dir: Path, name: str
) -> tuple[ShardedImages, np.ndarray]:
    """Return the images (read from the shards on demand) and labels of a split."""
    return split_arrays(processed_dir, read_manifest(split_dir, name))


def split_arrays(
    processed_dir: Path, rows: pd.DataFrame
) -> tuple[ShardedImages, np.ndarray]:
    """Return the images and labels of manifest rows that are already read."""
    labels = rows["class_index"].to_numpy(dtype=np.int32)
    return ShardedImages(processed_dir, rows), labels


def check_manifest_labels(rows: pd.DataFrame, classes: list[str], source: Path) -> None:
    """Raise InputError unless each row's class index is in range and is the
    index of the row's label."""
    labels = rows["class_index"].to_numpy(dtype=np.int64)
    check_labels(labels, len(classes), source)
    names = np.array(classes, dtype=object)[labels]
    differ = np.flatnonzero(names != rows["label"].to_numpy(dtype=object))
    if len(differ):
        first = rows.iloc[differ[0]]
        raise InputError(
            f"{source}: row {differ[0] + 1} has label {first['label']!r} but "
            f"class_index {first['class_index']} ({names[differ[0]]!r}), and "
            f"{len(differ)} rows disagree; rerun the split stage (dvc repro split)"
        )


def check_labels(labels: np.ndarray, num_classes: int, source: Path) -> None:
    """Raise InputError when a class index lies outside 0 .. num_classes - 1."""
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if len(outside):
        raise InputError(
            f"{source}: class_index {int(outside[0])} is outside 0..{num_classes - 1} "
            f"({len(outside)} rows); rerun the preprocess and split stages"
        )


def epoch_order(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """Return the image order of `epoch`, which depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_images)


def _batches_dataset(
    generate, num_batches: int, image_shape: tuple[int, ...], num_classes: int | None
):
    """Wrap a generator of `num_batches` (images, labels) batches in tf.data."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_generator(
        generate,
        output_signature=(
            tf.TensorSpec((None, *image_shape), tf.uint8),
            tf.TensorSpec((None,), tf.int32),
        ),
    )
    return _finish(dataset, num_batches, num_classes)


def _gathered_dataset(
    pixels: np.ndarray,
    labels: np.ndarray,
    orders: np.ndarray,
    batch_size: int,
    num_classes: int | None,
):
    """Batch in-memory `pixels` in each row of `orders`, one row per epoch.

    TensorFlow gathers every batch itself, so no Python code runs per batch
    while Keras trains.
    """
    import tensorflow as tf

    images = tf.constant(pixels)
    targets = tf.constant(labels, dtype=tf.int32)

    def epoch_batches(order):
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    def gather(chosen):
        return tf.gather(images, chosen), tf.gather(targets, chosen)

    dataset = tf.data.Dataset.from_tensor_slices(orders).flat_map(epoch_batches)
    dataset = dataset.map(gather)
    num_batches = -(-orders.shape[1] // batch_size) * len(orders)
    return _finish(dataset, num_batches, num_classes)


def _finish(dataset, num_batches: int, num_classes: int | None):
    """Declare the length, one-hot the labels if asked, and prefetch.

    The declared length spares Keras an extra pass to find the end of the
    data. With `num_classes`, labels are one-hot.
    """
    import tensorflow as tf

    dataset = dataset.apply(tf.data.experimental.assert_cardinality(num_batches))
    if num_classes:
        dataset = dataset.map(lambda x, y: (x, tf.one_hot(y, num_classes)))
    # The batches come from one generator or array, with no files to shard
    # by, so each worker of a multi-worker strategy takes its share of every
    # batch.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def make_dataset(
    images: ShardedImages,
    labels: np.ndarray,
    batch_size: int,
    num_classes: int | None = None,
):
    """Build batches of one split in manifest order.

    The order is kept, so predictions line up with `labels`. The images are
    streamed from their shards unless they were loaded into memory.
    """
    if images.pixels is not None:
        order = np.arange(len(labels))[np.newaxis]
        return _gathered_dataset(images.pixels, labels, order, batch_size, num_classes)

    def generate():
        for start, batch in zip(
            range(0, len(labels), batch_size),
            images.batches(batch_size),
            strict=True,
        ):
            yield batch, labels[start : start + batch_size]

    num_batches = -(-len(labels) // batch_size)
    return _batches_dataset(generate, num_batches, images.image_shape, num_classes)


def predict_probabilities(
    model, images: ShardedImages, labels: np.ndarray, batch_size: int
) -> np.ndarray:
    """Return the model's class probabilities for `images`, in their order."""
    return model.predict(make_dataset(images, labels, batch_size), verbose=0)


def make_epochs_dataset(
    images: ShardedImages,
    labels: np.ndarray,
    batch_size: int,
    epochs: range,
    seed: int,
    num_classes: int | None = None,
):
    """Build the training batches of `epochs`, one shuffled pass per epoch.

    The images are streamed from their shards, so memory does not grow with
    the split, unless they were loaded into memory; the batches are the same
    either way. The order of epoch e depends only on (seed, e), so the
    batches of a run resumed at epoch e match those of an uninterrupted run.
    Pass `steps_per_epoch` to `fit`, because the dataset contains every epoch.
    """
    if images.pixels is not None:
        orders = np.array(
            [epoch_order(len(labels), seed, epoch) for epoch in epochs],
            dtype=np.int32 if len(labels) < 2**31 else np.int64,
        ).reshape(len(epochs), len(labels))
        return _gathered_dataset(images.pixels, labels, orders, batch_size, num_classes)

    def generate():
        for epoch in epochs:
            order = epoch_order(len(labels), seed, epoch)
            for start in range(0, len(order), batch_size):
                chosen = order[start : start + batch_size]
                yield images.take(chosen), labels[chosen]

    num_batches = -(-len(labels) // batch_size) * len(epochs)
    return _batches_dataset(generate, num_batches, images.image_shape, num_classes)


def balanced_class_weights(labels: np.ndarray) -> dict[int, float]:
    """Return the weight n_images / (n_classes * n_images_of_class) of each class.

    Only the classes present in `labels` get a weight. Every class then adds
    the same total weight to the loss.
    """
    classes, counts = np.unique(labels, return_counts=True)
    weights = len(labels) / (len(classes) * counts)
    return {int(c): float(w) for c, w in zip(classes, weights, strict=True)}


def epoch_logger(
    history: list[dict[str, float]],
    learning_rate: Callable[[int], float] | None = None,
    save_checkpoint: Callable[[int], None] | None = None,
    log_to_mlflow: bool = True,
):
    """Return a Keras callback that records each epoch's metrics.

    Each epoch's values are appended to `history` under the pipeline's metric
    names, with the 1-based epoch number, which is the MLflow step.
    `learning_rate(step)` gives the rate of the epoch's last optimizer step.
    `save_checkpoint(epoch)` runs before the MLflow logging, so a run killed
    in between has the epoch in its checkpoint and logs it on resume.
    """
    import keras
    import mlflow

    from stages.tracking import finite_metrics

    class EpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            values = {METRIC_NAMES.get(k, k): float(v) for k, v in (logs or {}).items()}
            if "learning_rate" not in values:
                values["learning_rate"] = self._learning_rate()
            history.append({"epoch": epoch + 1, **values})
            if save_checkpoint is not None:
                save_checkpoint(epoch + 1)
            if log_to_mlflow:
                mlflow.log_metrics(finite_metrics(values), step=epoch + 1)

        def _learning_rate(self) -> float:
            optimizer = self.model.optimizer
            if learning_rate is None:
                return float(keras.ops.convert_to_numpy(optimizer.learning_rate))
            step = int(keras.ops.convert_to_numpy(optimizer.iterations)) - 1
            return learning_rate(step)

    return EpochLogger()


def seed_states(model) -> list:
    """Return the state variables of the model's random layers, in layer order."""
    return [v for v in model.variables if v.name == SEED_STATE_NAME]


def epoch_seed_reset(seed: int):
    """Return a callback that reseeds every random layer at each epoch's start.

    Layer i starts epoch e from a state derived from (seed, e, i), not from
    wherever the previous epoch left it.
    """
    import keras

    class EpochSeedReset(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            for index, state in enumerate(seed_states(self.model)):
                entropy = np.random.SeedSequence([seed, epoch, index])
                start = int(entropy.generate_state(1)[0])
                state.assign(np.array([start, 0], dtype=state.dtype))

    return EpochSeedReset()


def early_stopping(
    cfg: EarlyStoppingConfig,
    saved: dict[str, Any] | None = None,
    best_weights: list[np.ndarray] | None = None,
):
    """Return Keras EarlyStopping that keeps the best weights and can resume.

    `saved` is a previous `state()` of the callback, with the `best_weights`
    of that run, restored when training begins.
    """
    import keras

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        def on_train_begin(self, logs: dict | None = None) -> None:
            super().on_train_begin(logs)
            if saved is not None:
                self.wait = saved["wait"]
                self.best = saved["best"]
                self.best_epoch = saved["best_epoch"]
                self.stopped_epoch = saved["stopped_epoch"]
                self.best_weights = best_weights

        def state(self) -> dict[str, Any]:
            best = None if self.best is None else float(self.best)
            return {
                "wait": self.wait,
                "best": best,
                "best_epoch": self.best_epoch,
                "stopped_epoch": self.stopped_epoch,
            }

    return ResumableEarlyStopping(
        monitor=KERAS_NAMES[cfg.monitor],
        mode="max" if cfg.monitor.endswith("accuracy") else "min",
        patience=cfg.patience,
        min_delta=cfg.min_delta,
        restore_best_weights=True,
        verbose=1,
    )


def hash_images(images: ShardedImages, chunk: int = 256) -> str:
    """Return the SHA-256 of the images' shape and pixels, read in chunks."""
    digest = hashlib.sha256(f"{images.shape}".encode())
    for batch in images.batches(chunk):
        digest.update(batch.data)
    return digest.hexdigest()


def training_fingerprint(
    params: dict[str, Any], split_dir: Path, images: list[ShardedImages]
) -> dict[str, str]:
    """Identify what a checkpoint was made for: settings, manifests and pixels.

    A checkpoint resumes only a run with the same train, model and augment
    sections, the same train and val manifests and the same image data.
    """
    sections = {name: params.get(name) for name in ("train", "model", "augment")}
    # Where the pixels are held does not change the batches, so a run resumes
    # after a change of train.cache_mb.
    sections["train"] = {
        k: v for k, v in (sections["train"] or {}).items() if k != "cache_mb"
    }
    text = json.dumps(sections, sort_keys=True, default=str)
    fingerprint = {"params": hashlib.sha256(text.encode()).hexdigest()}
    for name in ("train", "val"):
        manifest = split_dir / f"{name}.csv"
        fingerprint[f"{name}_manifest"] = hashlib.sha256(
            manifest.read_bytes()
        ).hexdigest()
    digest = hashlib.sha256()
    for split in images:
        digest.update(hash_images(split).encode())
    fingerprint["data"] = digest.hexdigest()
    return fingerprint


@dataclass
class TrainingState:
    """Progress after a completed epoch, as a checkpoint stores it."""

    epoch: int  # epochs completed over all phases, 1-based
    phase: str  # name of the phase that epoch belongs to
    phase_start: int  # epochs completed before that phase began
    stopped: bool = False  # early stopping ended the phase at this epoch
    run_id: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    early_stopping: dict[str, Any] | None = None


class CheckpointStore:
    """A folder with the newest epoch's weights and optimizer state.

    Layout: state.json (a TrainingState, the fingerprint and the weight
    folders it refers to) and epoch-NNNN/model.weights.h5 for the newest
    epoch and, with early stopping, the best one. Each folder is complete
    before state.json names it, and state.json is replaced atomically, so a
    run killed at any moment leaves the previous complete checkpoint.
    """

    STATE_FILE = "state.json"
    WEIGHTS_FILE = "model.weights.h5"

    def __init__(self, folder: Path, fingerprint: dict[str, str]) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        # MLflow run of an unfinished checkpoint that load() could not resume.
        self.abandoned_run_id: str | None = None

    def weights_file(self, epoch: int) -> Path:
        """Return the weights file of `epoch`'s checkpoint."""
        return self.folder / f"epoch-{epoch:04d}" / self.WEIGHTS_FILE

    def load(self) -> TrainingState | None:
        """Return the state of an unfinished run made for this fingerprint, if any."""
        saved = self._read()
        if saved is None:
            return None
        if saved.get("complete"):
            log.info(
                "Checkpoint in %s is of a finished run; starting fresh", self.folder
            )
            return None

        made_for = saved.get("fingerprint") or {}
        changed = [k for k, v in self.fingerprint.items() if made_for.get(k) != v]
        run_id = (saved.get("state") or {}).get("run_id")
        self.abandoned_run_id = run_id if isinstance(run_id, str) else None
        if changed:
            log.info(
                "Checkpoint in %s was made for other %s; starting fresh",
                self.folder,
                ", ".join(changed),
            )
            return None

        try:
            state = TrainingState(**saved["state"])
        except (KeyError, TypeError) as error:
            log.warning("Ignoring invalid checkpoint in %s: %s", self.folder, error)
            return None

        needed = [self.weights_file(state.epoch)]
        if (state.early_stopping or {}).get("best") is not None:
            needed.append(self.weights_file(state.early_stopping["best_epoch"] + 1))
        missing = [str(path) for path in needed if not path.is_file()]
        if missing:
            log.warning("Checkpoint files %s are missing; starting fresh", missing)
            return None
        self.abandoned_run_id = None
        return state

    def _read(self) -> dict[str, Any] | None:
        path = self.folder / self.STATE_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            log.warning("Ignoring unreadable checkpoint %s: %s", path, error)
            return None

    def save(self, model, state: TrainingState, best_epoch: int | None = None) -> None:
        """Write `model`'s weights and optimizer state for `state.epoch`.

        `best_epoch` (1-based) names an earlier checkpoint to keep for early
        stopping; the others are deleted once state.json is replaced.
        """
        target = self.weights_file(state.epoch)
        with atomic_dir(target.parent) as tmp:
            model.save_weights(tmp / self.WEIGHTS_FILE)
        saved = {
            "complete": False,
            "fingerprint": self.fingerprint,
            "state": asdict(state),
        }
        write_json(self.folder / self.STATE_FILE, saved)
        keep = {target.parent.name}
        if best_epoch:
            keep.add(self.weights_file(best_epoch).parent.name)
        self._prune(keep)

    def mark_complete(self, run_id: str | None, epochs: int) -> None:
        """Record that the run finished, so the next run starts fresh."""
        finished = {
            "complete": True,
            "fingerprint": self.fingerprint,
            "run_id": run_id,
            "epochs": epochs,
        }
        write_json(self.folder / self.STATE_FILE, finished)
        self._prune(set())

    def _prune(self, keep: set[str]) -> None:
        for folder in self.folder.glob("epoch-*"):
            if folder.name not in keep:
                remove_stale_tmp(folder)
                shutil.rmtree(folder, ignore_errors=True)
