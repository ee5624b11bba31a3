"""Model builders: Keras Applications backbones with their own preprocessing,
weights from a local file, a clear error for a failed download, augmentation
that is active in training only, and fine-tuning that keeps batch norm frozen."""

from __future__ import annotations

import copy
import urllib.error
from pathlib import Path

import keras
import numpy as np
import pytest

from stages.cli import InputError
from stages.config import (
    SECTIONS,
    AugmentConfig,
    ConfigError,
    ModelConfig,
    read_params_file,
    validate,
)
from stages.models import (
    build_model,
    freeze_backbone,
    get_backbone,
    inference_model,
    unfreeze_top_layers,
)
from tests.conftest import ROOT

BASIC = AugmentConfig(
    name="basic",
    flip="horizontal",
    rotation=0.05,
    zoom=0.1,
    translation=0.1,
    contrast=0.1,
    brightness=0.1,
)


def backbone_config(architecture: str, **values) -> ModelConfig:
    """A small backbone model: 32x32 input, and alpha 0.35 for MobileNetV2."""
    values = {"input_size": [32, 32], "alpha": 0.35, **values}
    return ModelConfig(name=architecture, architecture=architecture, **values)


def pixels(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def save_mobilenet_weights(path: Path, alpha: float = 0.35) -> list[np.ndarray]:
    """Save a MobileNetV2 backbone with random weights; return its weights."""
    keras.utils.set_random_seed(7)
    backbone = keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(32, 32, 3), alpha=alpha
    )
    backbone.save_weights(path)
    return backbone.get_weights()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2.weights.h5"
    return path, save_mobilenet_weights(path)


def test_models_mobilenet_applies_preprocess_input() -> None:
    model = build_model((32, 32, 1), 10, backbone_config("mobilenet_v2"))
    prepare = keras.Model(model.input, model.get_layer("prep").output)
    images = pixels((4, 32, 32, 1))
    rgb = np.repeat(images, 3, axis=-1).astype("float32")
    expected = keras.applications.mobilenet_v2.preprocess_input(rgb)
    assert np.allclose(prepare.predict(images, verbose=0), expected, atol=1e-5)

    probabilities = model.predict(images, verbose=0)
    assert probabilities.shape == (4, 10)
    assert probabilities.dtype == np.float32
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_models_efficientnet_gets_raw_pixels() -> None:
    model = build_model((32, 32, 1), 3, backbone_config("efficientnet_b0"))
    images = pixels((2, 32, 32, 1)).astype("float32")
    # EfficientNet scales and normalises inside the backbone itself.
    rgb = np.repeat(images, 3, axis=-1)
    assert np.array_equal(keras.applications.efficientnet.preprocess_input(rgb), rgb)
    to_backbone = keras.Model(model.input, model.get_layer("gray_to_rgb").output)
    assert np.array_equal(to_backbone.predict(images, verbose=0), rgb)
    assert model.predict(images, verbose=0).shape == (2, 3)


def test_models_loads_local_weights_file(weights_file) -> None:
    path, saved = weights_file
    cfg = backbone_config("mobilenet_v2", weights=str(path))
    model = build_model((16, 16, 1), 10, cfg)
    loaded = get_backbone(model).get_weights()
    assert len(loaded) == len(saved)
    assert all(np.array_equal(a, b) for a, b in zip(loaded, saved, strict=True))


def test_models_missing_weights_file(tmp_path: Path) -> None:
    cfg = backbone_config("mobilenet_v2", weights=str(tmp_path / "gone.weights.h5"))
    with pytest.raises(InputError, match=r"model.weights: file .*gone.weights.h5"):
        build_model((32, 32, 3), 10, cfg)


def test_models_weights_of_other_width(weights_file) -> None:
    cfg = backbone_config("mobilenet_v2", weights=str(weights_file[0]), alpha=0.5)
    with pytest.raises(InputError, match="same alpha"):
        build_model((32, 32, 3), 10, cfg)


def test_models_failed_download_names_local_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keras.src.utils import file_utils

    requested = []

    def offline(url: str, *args, **kwargs) -> None:
        requested.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    # An empty Keras cache, and a download that fails the way it does offline.
    monkeypatch.setattr(file_utils.config, "keras_home", lambda: str(tmp_path))
    monkeypatch.setattr(file_utils, "urlretrieve", offline)
    cfg = backbone_config("mobilenet_v2", weights="imagenet", alpha=1.0)
    with pytest.raises(InputError) as error:
        build_model((32, 32, 3), 10, cfg)
    message = str(error.value)
    assert len(requested) == 1
    assert "downloading the ImageNet weights of mobilenet_v2 failed" in message
    assert "model.weights=/path/to/file.weights.h5" in message
    assert "Temporary failure in name resolution" in message


def test_models_augmentation_only_in_training() -> None:
    keras.utils.set_random_seed(1)
    cfg = ModelConfig(name="cnn_small", filters=[8], dense_units=[16])
    model = build_model((16, 16, 1), 10, cfg, BASIC)
    augment = model.get_layer("augment")
    images = pixels((8, 16, 16, 1)).astype("float32")

    trained_on = keras.ops.convert_to_numpy(augment(images, training=True))
    assert trained_on.shape == images.shape
    assert not np.allclose(trained_on, images)
    inferred_on = keras.ops.convert_to_numpy(augment(images, training=False))
    assert np.array_equal(inferred_on, images)

    first = model.predict(images, verbose=0)
    assert np.array_equal(model.predict(images, verbose=0), first)
    plain = build_model((16, 16, 1), 10, cfg, AugmentConfig(name="none"))
    with pytest.raises(ValueError):
        plain.get_layer("augment")
    plain.set_weights(model.get_weights())
    assert np.allclose(plain.predict(images, verbose=0), first, atol=1e-6)


def test_models_resnet_saved_with_preprocessing(tmp_path: Path) -> None:
    keras.utils.set_random_seed(2)
    model = build_model((32, 32, 3), 4, backbone_config("resnet50"), BASIC)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    path = tmp_path / "model.keras"
    inference_model(model).save(path)
    loaded = keras.models.load_model(path)
    assert not loaded.compiled
    images = pixels((2, 32, 32, 3))
    assert np.allclose(
        loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-5
    )
    # The loaded model flips RGB to BGR and subtracts the ImageNet means.
    prepare = keras.Model(loaded.input, loaded.get_layer("prep").output)
    expected = keras.applications.resnet50.preprocess_input(images.astype("float32"))
    assert np.allclose(prepare.predict(images, verbose=0), expected, atol=1e-4)


def test_models_fine_tuning_keeps_batch_norm_frozen(weights_file) -> None:
    cfg = backbone_config("mobilenet_v2", weights=str(weights_file[0]))
    model = build_model((32, 32, 3), 10, cfg)
    backbone = get_backbone(model)
    freeze_backbone(model)
    assert backbone.trainable_weights == []
    head = len(model.trainable_weights)

    unfreeze_top_layers(model, 10)
    top = backbone.layers[-10:]
    assert not any(layer.trainable for layer in backbone.layers[:-10])
    assert any(layer.trainable and layer.weights for layer in top)
    for layer in top:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not layer.trainable, layer.name
    assert len(model.trainable_weights) > head


def test_models_mixed_precision_output_float32() -> None:
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        cfg = ModelConfig(name="cnn_small", filters=[8], dense_units=[16])
        model = build_model((16, 16, 1), 10, cfg)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert model.get_layer("block1_conv1").compute_dtype == "bfloat16"
    probabilities = model.predict(pixels((2, 16, 16, 1)), verbose=0)
    assert probabilities.dtype == np.float32


@pytest.fixture
def params() -> dict:
    return read_params_file(ROOT / "params.yaml")


def backbone_params(params: dict, **values) -> dict:
    changed = copy.deepcopy(params)
    changed["model"] = {
        "name": "mobilenet_v2",
        "architecture": "mobilenet_v2",
        "weights": "imagenet",
        "input_size": [96, 96],
        "fine_tune": {"layers": 20, "epochs": 2, "learning_rate": 1e-5},
        **values,
    }
    return changed


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"weights": "backbone.npz"}, "model.weights: invalid value 'backbone.npz'"),
        ({"input_size": [16, 16]}, "at least 32 pixels"),
        ({"input_size": [96]}, "expected [height, width]"),
        ({"alpha": 0.6}, "ImageNet weights of mobilenet_v2 exist for alpha"),
        ({"weights": "none"}, "model.fine_tune.layers: with model.weights=none"),
        ({"fine_tune": {"layers": 3, "epochs": 0}}, "model.fine_tune.epochs: must"),
        ({"fine_tune": {"layer": 3}}, "did you mean 'layers'"),
        ({"fine_tune": {"learning_rate": 0}}, "must be greater than 0"),
        ({"architecture": "vgg16"}, "model.architecture: invalid value 'vgg16'"),
    ],
)
def test_models_config_rejects(params: dict, values: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        validate(backbone_params(params, **values), list(SECTIONS), "params.yaml")
    assert expected in str(error.value)


def test_models_config_rejects_fine_tuning_the_cnn(params: dict) -> None:
    params["model"]["fine_tune"] = {"layers": 2, "epochs": 1}
    params["model"]["weights"] = "imagenet"
    with pytest.raises(ConfigError) as error:
        validate(params, ["model"], "params.yaml")
    message = str(error.value)
    assert "the cnn trains every layer from the start" in message
    assert "the cnn starts from random weights" in message


def test_models_config_accepts_backbone(params: dict) -> None:
    loaded = validate(backbone_params(params), list(SECTIONS), "params.yaml")
    assert loaded.model.fine_tune.layers == 20
    assert loaded.model.fine_tune.learning_rate == pytest.approx(1e-5)
