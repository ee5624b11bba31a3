"""Stage train: fit the configured Keras model and track it in MLflow.

Reads params: model, augment, train, tracking, dataset.name. Reads:
data/processed/, data/split/. Writes: models/model.keras,
models/test_predictions.npz (the trained model's class probabilities for the
test split, which the evaluate stage scores), metrics/train.json (final
metrics and the MLflow run id), metrics/history.csv (one row per epoch) and
checkpoints/ (the newest epoch, from which a killed run resumes in the same
MLflow run).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stages.cli import InputError, run_stage
from stages.config import ModelConfig, Params, load_params
from stages.fsutil import atomic_file, write_json
from stages.hardware import HardwarePlan
from stages.pruning import pruning_callback
from stages.shards import ShardedImages
from stages.tfimport import import_keras
from stages.training import CheckpointStore, TrainingState

log = logging.getLogger("stages.train")

PROCESSED_DIR = Path("data/processed")
SPLIT_DIR = Path("data/split")
OUTPUTS = {
    "model": Path("models/model.keras"),
    "predictions": Path("models/test_predictions.npz"),
    "metrics": Path("metrics/train.json"),
    "history": Path("metrics/history.csv"),
    "checkpoints": Path("checkpoints"),
}


@dataclass(frozen=True)
class Phase:
    """A training phase: one `fit` call with its epochs and trainable layers.

    The first phase trains the head (or the whole CNN); fine-tuning then
    unfreezes the top `unfreeze` backbone layers and trains at `learning_rate`.
    """

    name: str
    epochs: int
    learning_rate: float | None = None  # None: train.learning_rate and schedule
    unfreeze: int = 0


@dataclass
class TrainingSession:
    """Data, hardware and checkpoint store of one training process."""

    params: Params
    data: dict[str, tuple[ShardedImages, np.ndarray]]  # split name: images, labels
    num_classes: int
    plan: HardwarePlan
    strategy: object
    store: CheckpointStore
    split_dir: Path
    class_weight: dict[int, float] | None = None
    save_epochs: bool = True  # False: no per-epoch checkpoints
    run_id: str | None = None  # None: this process logs nothing to MLflow

    @property
    def global_batch_size(self) -> int:
        """Return train.batch_size (per replica) times the number of replicas."""
        return self.params.train.batch_size * self.strategy.num_replicas_in_sync


def phases(cfg: ModelConfig, epochs: int) -> list[Phase]:
    """Return the phases: `epochs` of training, then fine-tuning if configured."""
    from stages.models import is_pretrained

    planned = [Phase("train", epochs)]
    fine_tune = cfg.fine_tune
    if is_pretrained(cfg) and fine_tune.layers > 0:
        planned.append(
            Phase(
                "fine_tune",
                fine_tune.epochs,
                fine_tune.learning_rate,
                fine_tune.layers,
            )
        )
    return planned


def _prepare_hardware(params: Params):
    """Set precision, strategy and seeds; return the plan, strategy and MLflow tags."""
    import keras
    import tensorflow as tf

    from stages import hardware
    from stages.devices import cpu_flags, describe_devices, list_gpus

    gpus = list_gpus()
    plan = hardware.plan_hardware(params.train, gpus, os.environ, cpu_flags())
    # A multi-worker strategy must exist before TensorFlow runs any operation.
    strategy = hardware.create_strategy(plan)
    hardware.apply_precision(plan)
    keras.utils.set_random_seed(params.train.seed)
    if params.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    device = describe_devices([gpu.name for gpu in gpus])
    log.info(
        "Training on %s: %s precision, %s strategy with %d replicas%s",
        device,
        plan.precision,
        plan.strategy,
        strategy.num_replicas_in_sync,
        ", deterministic ops" if params.train.deterministic else "",
    )
    tags = hardware.hardware_tags(plan, device, strategy.num_replicas_in_sync)
    return plan, strategy, tags


def _configure_layers(model, cfg: ModelConfig, phase: Phase) -> None:
    from stages.models import freeze_backbone, is_pretrained, unfreeze_top_layers

    if phase.unfreeze:
        unfreeze_top_layers(model, phase.unfreeze)
    elif is_pretrained(cfg):
        freeze_backbone(model)


def _compile(session: TrainingSession, model, phase: Phase):
    """Compile `model` for `phase`; return its learning rate or schedule."""
    from stages.models import compile_model
    from stages.schedules import build_optimizer, build_schedule, steps_per_epoch

    cfg = session.params.train
    if phase.learning_rate is None:
        steps = steps_per_epoch(
            len(session.data["train"][0]), session.global_batch_size
        )
        schedule = build_schedule(cfg, steps)
    else:
        schedule = phase.learning_rate
    with session.strategy.scope():
        compile_model(
            model, cfg, build_optimizer(cfg, schedule), session.plan.jit_compile
        )
    return schedule


def _restore(session: TrainingSession, model, state: TrainingState):
    """Load the checkpoint of `state` into the compiled model.

    Returns:
        The early-stopping best weights saved with it, or None.
    """
    with session.strategy.scope():
        model.optimizer.build(model.trainable_variables)
    best_weights = None
    stopping = state.early_stopping or {}
    if stopping.get("best") is not None:
        model.load_weights(session.store.weights_file(stopping["best_epoch"] + 1))
        best_weights = model.get_weights()
    model.load_weights(session.store.weights_file(state.epoch))
    log.info("Resumed from the checkpoint of epoch %d (%s)", state.epoch, state.phase)
    return best_weights


def _checkpoint_saver(session, model, phase, phase_start, history, stopper):
    """Return a function that checkpoints the epoch just completed, if enabled."""

    def save(epoch: int) -> None:
        if not session.save_epochs:
            return
        stopping = stopper.state() if stopper else None
        best_epoch = None
        if stopper is not None and stopper.best_weights is not None:
            best_epoch = stopper.best_epoch + 1
        state = TrainingState(
            epoch=epoch,
            phase=phase.name,
            phase_start=phase_start,
            stopped=bool(model.stop_training),
            run_id=session.run_id,
            history=history,
            early_stopping=stopping,
        )
        session.store.save(model, state, best_epoch)

    return save


def _fit_phase(session, model, phase, history, resume=None) -> int | None:
    """Train one phase, from `resume` if given, appending to `history`.

    Returns:
        The 1-based epoch whose weights early stopping restored, or None.
    """
    from stages import training
    from stages.schedules import learning_rate_at, steps_per_epoch

    cfg = session.params.train
    start = resume.phase_start if resume else len(history)
    epochs = range(resume.epoch if resume else start, start + phase.epochs)
    _configure_layers(model, session.params.model, phase)
    schedule = _compile(session, model, phase)
    best_weights = _restore(session, model, resume) if resume else None
    stopper = None
    if cfg.early_stopping.enabled:
        saved = resume.early_stopping if resume else None
        stopper = training.early_stopping(cfg.early_stopping, saved, best_weights)

    if len(epochs) == 0 or (resume and resume.stopped):
        if stopper is not None:  # restore the best weights, as fit() would
            stopper.set_model(model)
            stopper.on_train_begin()
            stopper.on_train_end()
        return _restored_epoch(stopper)

    train_data, val_data = _datasets(session, epochs)
    pruning = pruning_callback()
    callbacks = [
        training.epoch_seed_reset(cfg.seed),
        *([stopper] if stopper else []),
        *([pruning] if pruning else []),
        training.epoch_logger(
            history,
            lambda step: learning_rate_at(schedule, step),
            _checkpoint_saver(session, model, phase, start, history, stopper),
            log_to_mlflow=session.run_id is not None,
        ),
    ]
    log.info("Phase '%s': epochs %d to %d", phase.name, epochs.start + 1, epochs.stop)
    num_images = len(session.data["train"][0])
    model.fit(
        train_data,
        validation_data=val_data,
        initial_epoch=epochs.start,
        epochs=epochs.stop,
        steps_per_epoch=steps_per_epoch(num_images, session.global_batch_size),
        class_weight=session.class_weight,
        shuffle=False,
        callbacks=callbacks,
        verbose=2,
    )
    return _restored_epoch(stopper)


def _datasets(session: TrainingSession, epochs: range):
    """Return the training batches of `epochs` and the validation batches."""
    from stages.models import uses_one_hot_labels
    from stages.training import make_dataset, make_epochs_dataset

    cfg = session.params.train
    num_classes = session.num_classes if uses_one_hot_labels(cfg) else None
    x_train, y_train = session.data["train"]
    x_val, y_val = session.data["val"]
    train_data = make_epochs_dataset(
        x_train, y_train, session.global_batch_size, epochs, cfg.seed, num_classes
    )
    if not len(x_val):
        return train_data, None
    val_data = make_dataset(
        x_val, y_val, session.global_batch_size, num_classes=num_classes
    )
    return train_data, val_data


def _restored_epoch(stopper) -> int | None:
    if stopper is None or stopper.best_weights is None:
        return None
    return stopper.best_epoch + 1


def _class_weight(mode: str, labels: np.ndarray) -> dict[int, float] | None:
    from stages.training import balanced_class_weights

    if mode != "balanced":
        return None
    weights = balanced_class_weights(labels)
    log.info("Class weights: %s", {k: round(v, 3) for k, v in weights.items()})
    return weights


def fit(
    session: TrainingSession, model, state: TrainingState | None
) -> tuple[dict, list[dict[str, float]]]:
    """Run every phase of training, resuming from `state` when given.

    Returns:
        The metrics of the final epoch (or of the epoch whose weights early
        stopping kept) with the number of epochs and the training time, and
        the history with one row per epoch.
    """
    from stages.training import check_labels

    for name in ("train", "val", "test"):
        manifest = session.split_dir / f"{name}.csv"
        check_labels(session.data[name][1], session.num_classes, manifest)
    history = list(state.history) if state else []
    planned = phases(session.params.model, session.params.train.epochs)
    first = [p.name for p in planned].index(state.phase) if state else 0
    started = time.perf_counter()
    kept_epoch = None
    for phase in planned[first:]:
        resume = state if state is not None and state.phase == phase.name else None
        kept_epoch = _fit_phase(session, model, phase, history, resume)
    seconds = time.perf_counter() - started

    final = history[kept_epoch - 1] if kept_epoch else history[-1]
    metrics = {k: v for k, v in final.items() if k != "epoch"}
    metrics.update(epochs=len(history), train_seconds=round(seconds, 2))
    if kept_epoch:
        metrics["best_epoch"] = kept_epoch
    if state is not None:
        metrics["resumed_at_epoch"] = state.epoch
    return metrics, history


def _resume_run(params: Params, state: TrainingState, tags: dict[str, str]):
    """Reopen the MLflow run of `state`; return None when it cannot continue."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from stages import tracking

    experiment_id = tracking.use_experiment(params.tracking)
    try:
        stored = mlflow.get_run(state.run_id)
    except MlflowException as error:
        log.warning("MLflow run %s not found (%s); starting fresh", state.run_id, error)
        return None
    if stored.info.experiment_id != experiment_id:
        log.warning(
            "MLflow run %s is in another experiment; starting fresh", state.run_id
        )
        return None
    run = mlflow.start_run(
        run_id=state.run_id, log_system_metrics=params.tracking.system_metrics or None
    )
    mlflow.set_tags({**tags, "resumed_at_epoch": str(state.epoch)})
    _log_missing_epochs(state.run_id, state.history)
    return run


def _log_missing_epochs(run_id: str, history: list[dict[str, float]]) -> None:
    """Log the checkpointed epochs that the killed run did not log to MLflow."""
    import mlflow

    from stages.tracking import finite_metrics

    client = mlflow.tracking.MlflowClient()
    logged = {m.step for m in client.get_metric_history(run_id, "learning_rate")}
    for row in history:
        if row["epoch"] not in logged:
            values = {k: v for k, v in row.items() if k != "epoch"}
            mlflow.log_metrics(finite_metrics(values), step=int(row["epoch"]))


def _open_run(params, state, tags, split_dir: Path, processed_dir: Path):
    """Resume the run of `state`, or start a new one; return the run and state."""
    from stages import tracking

    if state is not None:
        run = _resume_run(params, state, tags)
        if run is not None:
            return run, state
    run = tracking.start_training_run(
        params.raw, params.tracking, tags, split_dir, processed_dir
    )
    return run, None


def _predict_test(session: TrainingSession, model) -> tuple:
    """Return the test split's manifest and the model's probabilities for it."""
    from stages.training import predict_probabilities, read_manifest

    manifest = read_manifest(session.split_dir, "test")
    images, labels = session.data["test"]
    if not len(images):
        return manifest, np.zeros((0, session.num_classes), dtype=np.float32)
    probabilities = predict_probabilities(
        model, images, labels, session.global_batch_size
    )
    return manifest, probabilities


def _save_outputs(session, model, history, outputs: dict) -> None:
    """Save the model (without optimizer) and its test predictions, log the
    model to MLflow, and write the history."""
    from stages.models import inference_model
    from stages.predictions import save_predictions
    from stages.tracking import log_keras_model

    params = session.params
    inference = inference_model(model)
    manifest, probabilities = _predict_test(session, inference)
    # Logged first: if MLflow fails, models/ keeps the model that the metrics
    # files still describe.
    if params.tracking.log_model:
        example = session.data["train"][0][:2]
        log_keras_model(inference, example, params.tracking.register_model)
    with atomic_file(outputs["model"]) as tmp:
        inference.save(tmp)
    save_predictions(outputs["predictions"], probabilities, manifest)
    with atomic_file(outputs["history"]) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)


def _load_data(processed_dir: Path, split_dir: Path, train_cfg):
    """Load the train and val splits and check them against the config."""
    from stages.training import load_split, read_classes

    classes = read_classes(processed_dir)
    # The test split is read now, so a missing manifest stops the stage before
    # training rather than after it.
    data = {
        name: load_split(processed_dir, split_dir, name)
        for name in ("train", "val", "test")
    }
    if len(data["train"][0]) == 0:
        raise InputError(f"{split_dir / 'train.csv'} is empty; raise split.train")
    stopping = train_cfg.early_stopping
    if (
        stopping.enabled
        and stopping.monitor.startswith("val_")
        and not len(data["val"][0])
    ):
        raise InputError(
            f"{split_dir / 'val.csv'} is empty, so train.early_stopping.monitor="
            f"{stopping.monitor} has no values; raise split.val or monitor "
            "train_loss"
        )
    if not len(data["val"][0]):
        log.warning(
            "%s is empty: training without validation, so no val_* metrics; "
            "raise split.val to validate",
            split_dir / "val.csv",
        )
    log.info(
        "Found %d train, %d val and %d test images of shape %s, %d classes",
        len(data["train"][0]),
        len(data["val"][0]),
        len(data["test"][0]),
        data["train"][0].shape[1:],
        len(classes),
    )
    return classes, data


def _cache_pixels(data: dict, limit_mb: int, strategy: str) -> None:
    """Load the train and val pixels into memory if they total at most
    `limit_mb` MiB and one device trains; otherwise they stream from the shards.

    Multi-device strategies can serialise the input pipeline's graph, which
    would then hold a copy of the pixels, so they always stream.
    """
    splits = [data[name][0] for name in ("train", "val")]
    size_mb = sum(images.nbytes for images in splits) / 2**20
    if strategy != "default":
        log.info(
            "Streaming the train and val pixels from the shards (%s strategy)", strategy
        )
    elif size_mb > limit_mb:
        log.info(
            "Streaming %.1f MiB of train and val pixels from the shards, as "
            "train.cache_mb=%d; raise it to hold them in memory",
            size_mb,
            limit_mb,
        )
    else:
        for images in splits:
            images.load()
        log.info("Loaded %.1f MiB of train and val pixels into memory", size_mb)


def _build(params: Params, input_shape, num_classes: int, plan, strategy):
    from stages.hardware import adapt_model
    from stages.models import build_model

    with strategy.scope():
        model = build_model(input_shape, num_classes, params.model, params.augment)
        return adapt_model(model, plan)


def train(
    overrides: list[str],
    processed_dir: Path = PROCESSED_DIR,
    split_dir: Path = SPLIT_DIR,
    outputs: dict[str, Path] | None = None,
) -> dict:
    """Train on the train split, validate on val, and return the final metrics.

    A checkpoint in outputs["checkpoints"] of a killed run with the same
    config and data is resumed, in the same MLflow run.
    """
    from stages.training import training_fingerprint

    outputs = {**OUTPUTS, **(outputs or {})}
    params = load_params(["model", "augment", "train", "tracking"], overrides)
    classes, data = _load_data(processed_dir, split_dir, params.train)
    # Imported only now, so a config or data error costs no TensorFlow import.
    import_keras()
    import tensorflow as tf

    plan, strategy, tags = _prepare_hardware(params)
    _cache_pixels(data, params.train.cache_mb, plan.strategy)
    model = _build(params, data["train"][0].shape[1:], len(classes), plan, strategy)
    fingerprint = training_fingerprint(
        params.raw, split_dir, [data["train"][0], data["val"][0]]
    )
    store = CheckpointStore(outputs["checkpoints"], fingerprint)
    session = TrainingSession(
        params, data, len(classes), plan, strategy, store, split_dir
    )
    session.class_weight = _class_weight(params.train.class_weight, data["train"][1])
    state = None
    if plan.strategy == "multi_worker":
        # NOTE: workers need not share a disk, so none of them checkpoints
        # or resumes; only the chief writes outputs and logs to MLflow.
        session.save_epochs = False
        if not plan.is_chief:
            metrics = fit(session, model, None)[0]
            log.info("Worker finished; the chief writes the outputs")
            return metrics
    else:
        state = store.load()
    tags.update(num_classes=str(len(classes)), tensorflow_version=tf.__version__)
    return _train_in_run(session, model, state, tags, outputs, processed_dir)


def _train_in_run(session, model, state, tags, outputs, processed_dir) -> dict:
    """Fit inside an MLflow run (new or resumed) and write every output."""
    import mlflow

    from stages import tracking
    from stages.tracking import run_status

    params = session.params
    abandoned = session.store.abandoned_run_id or (state.run_id if state else None)
    run, state = _open_run(params, state, tags, session.split_dir, processed_dir)
    session.run_id = run.info.run_id
    if abandoned and abandoned != run.info.run_id:
        tracking.close_abandoned_run(
            abandoned, f"run {run.info.run_id} replaced its unfinished checkpoint"
        )
    log.info("MLflow run %s%s", run.info.run_id, " (resumed)" if state else "")
    with run_status(run.info.run_id):
        metrics, history = fit(session, model, state)
        _save_outputs(session, model, history, outputs)
        metrics["mlflow_run_id"] = run.info.run_id
        metrics["mlflow_experiment_id"] = run.info.experiment_id
        mlflow.log_metric("train_seconds", metrics["train_seconds"])
        write_json(outputs["metrics"], metrics)
        session.store.mark_complete(run.info.run_id, metrics["epochs"])
    key = "val_accuracy" if "val_accuracy" in metrics else "train_accuracy"
    log.info("Saved %s; %s %.4f", outputs["model"], key, metrics.get(key, float("nan")))
    return metrics


if __name__ == "__main__":
    run_stage(train, __doc__)
