"""Learning-rate schedules and optimizers built from the train config.

Schedules count optimizer steps; `steps_per_epoch` converts the epoch-based
keys (warmup_epochs, decay_epochs) into steps.
"""

from __future__ import annotations

import logging
import math

import keras

from stages.config import TrainConfig

log = logging.getLogger(__name__)


@keras.saving.register_keras_serializable(package="image_pipeline")
class WarmupStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `learning_rate`, then step decay.

    After `warmup_steps`, the rate is multiplied by `decay_rate` every
    `decay_steps` steps; `decay_rate` = 1 keeps it constant.
    """

    def __init__(
        self,
        learning_rate: float,
        warmup_steps: int,
        decay_steps: int,
        decay_rate: float,
    ) -> None:
        super().__init__()
        self.learning_rate = learning_rate
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps
        self.decay_rate = decay_rate

    def __call__(self, step):
        from keras import ops

        step = ops.cast(step, "float32")
        warmup = ops.cast(self.warmup_steps, "float32")
        warming = self.learning_rate * step / ops.maximum(warmup, 1.0)
        decays = ops.floor(ops.maximum(step - warmup, 0.0) / self.decay_steps)
        decayed = self.learning_rate * ops.power(self.decay_rate, decays)
        return ops.where(step < warmup, warming, decayed)

    def get_config(self) -> dict:
        return {
            "learning_rate": self.learning_rate,
            "warmup_steps": self.warmup_steps,
            "decay_steps": self.decay_steps,
            "decay_rate": self.decay_rate,
        }


def build_schedule(cfg: TrainConfig, steps_per_epoch: int):
    """Return train.learning_rate as a number or a schedule over `cfg.epochs`.

    constant: the number itself, after an optional linear warm-up.
    step: warm-up, then times decay_rate every decay_epochs.
    cosine: warm-up, then Keras CosineDecay to 0 at the last epoch.
    """
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    if cfg.lr_schedule == "cosine":
        decay_steps = (cfg.epochs - cfg.warmup_epochs) * steps_per_epoch
        if not warmup_steps:
            return keras.optimizers.schedules.CosineDecay(
                cfg.learning_rate, decay_steps
            )
        return keras.optimizers.schedules.CosineDecay(
            0.0,
            decay_steps,
            warmup_target=cfg.learning_rate,
            warmup_steps=warmup_steps,
        )
    if cfg.lr_schedule == "step":
        decay_steps = cfg.decay_epochs * steps_per_epoch
        return WarmupStepDecay(
            cfg.learning_rate, warmup_steps, decay_steps, cfg.decay_rate
        )
    if warmup_steps:
        return WarmupStepDecay(cfg.learning_rate, warmup_steps, 1, 1.0)
    return cfg.learning_rate


def learning_rate_at(schedule, step: int) -> float:
    """Return the learning rate that `schedule` (or a number) gives at `step`."""
    if callable(schedule):
        return float(schedule(max(step, 0)))
    return float(schedule)


def build_optimizer(cfg: TrainConfig, learning_rate):
    """Return the configured optimizer with `learning_rate` (number or schedule)."""
    options = {"clipnorm": cfg.clipnorm} if cfg.clipnorm else {}
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(
            learning_rate, momentum=cfg.momentum, nesterov=cfg.nesterov, **options
        )
    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(
            learning_rate, weight_decay=cfg.weight_decay, **options
        )
    return keras.optimizers.Adam(learning_rate, **options)


def steps_per_epoch(num_images: int, global_batch_size: int) -> int:
    """Return the number of batches in one pass over `num_images`."""
    return max(math.ceil(num_images / global_batch_size), 1)
