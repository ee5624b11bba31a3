"""Keras model builders. Every model takes uint8 pixels and scales them itself,
so a saved model applies its own input preprocessing."""

from __future__ import annotations

import logging

from stages.config import ModelConfig, TrainConfig

log = logging.getLogger(__name__)


def build_cnn(input_shape: tuple[int, int, int], num_classes: int, cfg: ModelConfig):
    """Build convolution blocks, dense layers and a softmax over `num_classes`.

    Each block holds `convs_per_block` convolutions with `filters[i]` filters
    (optionally batch-normalised) and ends with 2x2 max pooling, as long as
    the feature map is still at least 2 pixels wide.
    """
    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape, name="pixels")
    x = layers.Rescaling(1.0 / 255, name="scale")(inputs)
    for block, filters in enumerate(cfg.filters):
        for conv in range(cfg.convs_per_block):
            name = f"block{block + 1}_conv{conv + 1}"
            x = layers.Conv2D(
                filters,
                cfg.kernel_size,
                padding="same",
                use_bias=not cfg.batch_norm,
                name=name,
            )(x)
            if cfg.batch_norm:
                x = layers.BatchNormalization(name=f"{name}_bn")(x)
            x = layers.Activation("relu", name=f"{name}_relu")(x)
        if min(x.shape[1], x.shape[2]) >= 2:
            x = layers.MaxPooling2D(2, name=f"block{block + 1}_pool")(x)
    x = layers.Flatten(name="flatten")(x)
    for i, units in enumerate(cfg.dense_units):
        x = layers.Dense(units, activation="relu", name=f"dense{i + 1}")(x)
        if cfg.dropout:
            x = layers.Dropout(cfg.dropout, name=f"dropout{i + 1}")(x)
    if not cfg.dense_units and cfg.dropout:
        x = layers.Dropout(cfg.dropout, name="dropout")(x)
    # The output stays float32 even under a mixed-precision policy.
    outputs = layers.Dense(
        num_classes, activation="softmax", dtype="float32", name="probabilities"
    )(x)
    return keras.Model(inputs, outputs, name=cfg.name)


def build_optimizer(cfg: TrainConfig):
    """Return the configured Keras optimizer."""
    import keras

    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(cfg.learning_rate, momentum=cfg.momentum)
    return keras.optimizers.Adam(cfg.learning_rate)


def compile_model(model, cfg: TrainConfig) -> None:
    """Compile for integer labels with accuracy as the metric."""
    model.compile(
        optimizer=build_optimizer(cfg),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
