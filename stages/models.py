"""Keras model builders. Every model takes uint8 pixels (N, H, W, C) and
prepares them itself (augmentation in training, resizing, scaling), so a
saved model applies its own input preprocessing and loads without custom code.
"""

from __future__ import annotations

import logging
import urllib.error
from pathlib import Path

import numpy as np

from stages.cli import InputError
from stages.config import AugmentConfig, ModelConfig, TrainConfig

log = logging.getLogger(__name__)

BACKBONE_LAYER = "backbone"
AUGMENT_LAYER = "augment"
# keras.applications.resnet50.preprocess_input ("caffe" mode) flips RGB to BGR
# and subtracts these ImageNet channel means, in BGR order.
CAFFE_MEANS_BGR = (103.939, 116.779, 123.68)


def build_model(
    input_shape: tuple[int, int, int],
    num_classes: int,
    cfg: ModelConfig,
    augment: AugmentConfig | None = None,
):
    """Build the configured architecture over uint8 images of `input_shape`.

    Random augmentation layers (active in training only) come first, then an
    optional resize to `cfg.input_size`, then the CNN or the backbone and head.

    Raises:
        InputError: when the backbone's weights cannot be downloaded or read.
    """
    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape, name="pixels")
    x = inputs
    augmentation = build_augmentation(augment)
    if augmentation is not None:
        x = augmentation(x)
    if cfg.input_size:
        x = layers.Resizing(*cfg.input_size, name="resize")(x)
    if cfg.architecture == "cnn":
        outputs = _cnn_layers(x, num_classes, cfg)
    else:
        outputs = _backbone_layers(x, num_classes, cfg)
    model = keras.Model(inputs, outputs, name=cfg.name)
    log.info(
        "Model '%s' (%s) with %d parameters",
        model.name,
        cfg.architecture,
        model.count_params(),
    )
    return model


def build_augmentation(cfg: AugmentConfig | None):
    """Return the configured random layers as one Sequential, or None if all are off.

    Inside a model, Keras applies them only in training (fit), so they never
    change predictions. Pixel values stay in 0-255.
    """
    import keras
    from keras import layers

    if cfg is None:
        return None
    steps = []
    if cfg.flip != "none":
        steps.append(layers.RandomFlip(cfg.flip))
    if cfg.rotation:
        steps.append(layers.RandomRotation(cfg.rotation))
    if cfg.zoom:
        steps.append(layers.RandomZoom(cfg.zoom))
    if cfg.translation:
        steps.append(layers.RandomTranslation(cfg.translation, cfg.translation))
    if cfg.contrast:
        steps.append(layers.RandomContrast(cfg.contrast))
    if cfg.brightness:
        steps.append(layers.RandomBrightness(cfg.brightness))
    if not steps:
        return None
    log.info("Augmentation '%s': %s", cfg.name, ", ".join(s.name for s in steps))
    return keras.Sequential(steps, name=AUGMENT_LAYER)


def _cnn_layers(x, num_classes: int, cfg: ModelConfig):
    """Add convolution blocks, dense layers and a softmax over `num_classes`.

    Each block holds `convs_per_block` convolutions with `filters[i]` filters
    (optionally batch-normalised) and ends with 2x2 max pooling, as long as
    the feature map is still at least 2 pixels wide.
    """
    from keras import layers

    x = layers.Rescaling(1.0 / 255, name="scale")(x)
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
    return _output_layer(x, num_classes)


def _output_layer(x, num_classes: int):
    from keras import layers

    # The output stays float32 even under a mixed-precision policy.
    return layers.Dense(
        num_classes, activation="softmax", dtype="float32", name="probabilities"
    )(x)


def is_pretrained(cfg: ModelConfig) -> bool:
    """Return whether the model starts from a pretrained backbone."""
    return cfg.architecture != "cnn" and cfg.weights != "none"


def _backbone_layers(x, num_classes: int, cfg: ModelConfig):
    """Add RGB conversion, the backbone's preprocessing, the backbone and a head.

    A pretrained backbone runs in inference mode (training=False), so its
    batch normalisation keeps the ImageNet statistics even when unfrozen.
    """
    from keras import layers

    if x.shape[-1] == 1:
        x = layers.Concatenate(name="gray_to_rgb")([x, x, x])
    x = backbone_preprocessing(x, cfg.architecture)
    backbone = load_backbone(cfg, (x.shape[1], x.shape[2], 3))
    x = backbone(x, training=False if is_pretrained(cfg) else None)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if cfg.dropout:
        x = layers.Dropout(cfg.dropout, name="dropout")(x)
    return _output_layer(x, num_classes)


def backbone_preprocessing(x, architecture: str):
    """Apply `keras.applications.<family>.preprocess_input` with built-in layers.

    Built-in layers (not a Lambda) keep the saved model loadable anywhere.
    """
    from keras import layers

    if architecture == "mobilenet_v2":  # "tf" mode: scale to [-1, 1]
        return layers.Rescaling(1 / 127.5, offset=-1, dtype="float32", name="prep")(x)
    if architecture == "resnet50":
        # A frozen 1x1 linear map: reversed channel order, minus the means.
        caffe = layers.Dense(3, trainable=False, dtype="float32", name="prep")
        x = caffe(x)
        caffe.set_weights(
            [np.eye(3, dtype="float32")[::-1], -np.array(CAFFE_MEANS_BGR, "float32")]
        )
        return x
    # EfficientNet's preprocess_input does nothing: the model rescales itself.
    return x


def load_backbone(cfg: ModelConfig, input_shape: tuple[int, int, int]):
    """Create the Keras Applications backbone without its top, with its weights.

    Raises:
        InputError: the ImageNet download failed, or the local weights file is
            missing or does not fit the backbone.
    """
    import keras

    applications = {
        "mobilenet_v2": (keras.applications.MobileNetV2, {"alpha": cfg.alpha}),
        "efficientnet_b0": (keras.applications.EfficientNetB0, {}),
        "resnet50": (keras.applications.ResNet50, {}),
    }
    constructor, options = applications[cfg.architecture]
    weights = _resolve_weights(cfg.weights)
    try:
        backbone = constructor(
            include_top=False, weights=weights, input_shape=input_shape, **options
        )
    except Exception as error:
        raise _weights_error(cfg, error) from error
    backbone.name = BACKBONE_LAYER
    log.info("Backbone %s, weights %s", cfg.architecture, cfg.weights)
    return backbone


def _resolve_weights(weights: str) -> str | None:
    if weights == "none":
        return None
    if weights == "imagenet":
        return weights
    path = Path(weights).expanduser()
    if not path.is_file():
        raise InputError(
            f"model.weights: file {path} not found; pass an existing "
            ".weights.h5 file, or model.weights=imagenet or model.weights=none"
        )
    return str(path)


def _weights_error(cfg: ModelConfig, error: Exception) -> Exception:
    """Turn a weights failure into an InputError naming the fix; else keep it."""
    download_failed = isinstance(error, (OSError, urllib.error.URLError)) or (
        "URL fetch failure" in str(error)
    )
    if cfg.weights == "imagenet" and download_failed:
        return InputError(
            f"model.weights=imagenet: downloading the ImageNet weights of "
            f"{cfg.architecture} failed ({error}). Without internet access, copy "
            "the weights file to this machine and pass its path: "
            "model.weights=/path/to/file.weights.h5 (or train from scratch "
            "with model.weights=none)"
        )
    if cfg.weights not in ("imagenet", "none") and isinstance(
        error, (ValueError, OSError)
    ):
        return InputError(
            f"model.weights: cannot load {cfg.weights} into {cfg.architecture} "
            f"({error}); pass weights saved from the same backbone without its "
            "top (include_top=False) and, for mobilenet_v2, the same alpha"
        )
    return error


def get_backbone(model):
    """Return the backbone layer of `model`, or None for the CNN."""
    try:
        return model.get_layer(BACKBONE_LAYER)
    except ValueError:
        return None


def freeze_backbone(model) -> None:
    """Freeze every layer of the backbone, so only the head trains."""
    backbone = get_backbone(model)
    if backbone is not None:
        backbone.trainable = False


def unfreeze_top_layers(model, num_layers: int) -> None:
    """Unfreeze the top `num_layers` backbone layers except batch normalisation."""
    from keras import layers

    backbone = get_backbone(model)
    if backbone is None:
        return
    backbone.trainable = True
    split = max(len(backbone.layers) - num_layers, 0)
    for index, layer in enumerate(backbone.layers):
        batch_norm = isinstance(layer, layers.BatchNormalization)
        layer.trainable = index >= split and not batch_norm
    trainable = sum(1 for layer in backbone.layers if layer.trainable)
    log.info("Fine-tuning %d of the top %d backbone layers", trainable, num_layers)


def uses_one_hot_labels(cfg: TrainConfig) -> bool:
    """Return whether labels must be one-hot: Keras smooths categorical labels only."""
    return cfg.label_smoothing > 0


def compile_model(
    model, cfg: TrainConfig, optimizer, jit_compile: bool = False
) -> None:
    """Compile with cross-entropy (smoothed if configured) and accuracy."""
    import keras

    if uses_one_hot_labels(cfg):
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing)
    else:
        loss = keras.losses.SparseCategoricalCrossentropy()
    model.compile(
        optimizer=optimizer, loss=loss, metrics=["accuracy"], jit_compile=jit_compile
    )


def inference_model(model):
    """Return an uncompiled model sharing `model`'s layers, for saving.

    It contains no optimizer or learning-rate schedule, so it loads with
    plain `keras.models.load_model`.
    """
    import keras

    return keras.Model(model.inputs, model.outputs, name=model.name)
