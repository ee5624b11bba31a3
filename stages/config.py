"""Typed schema of params.yaml, its validation, and command-line overrides.

params.yaml is the Hydra composition of conf/. `dvc exp run -S ...` rewrites
it on every run; `dvc repro` reads it as committed, so `python -m stages.config`
(or `make params`) regenerates it after conf/ changes.

Every stage calls `load_params` with the sections it reads. Problems are
collected and raised together as one `ConfigError` before any heavy work.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PARAMS_FILE = "params.yaml"
CONF_DIR = "conf"
CONFIG_NAME = "config"
MISSING = "???"  # OmegaConf's marker for a required value


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def _bounds(**limits: float) -> dict[str, dict[str, float]]:
    return {"metadata": limits}


@dataclass(frozen=True)
class DatasetConfig:
    """Dataset source and its settings. Each source reads only its own keys.

    digits needs nothing. folder reads `path` (a folder of class folders).
    table reads `path` (a CSV or Parquet file), `image_column` and
    `label_column`. archive reads `url` (http(s) URL or local path), `sha256`,
    `allow_unverified`, `subdir`, `cache_dir`, `max_bytes`, `max_members` and
    the download limits `max_download_seconds` (whole download, retries
    included; null for none), `min_download_rate` (bytes per second; 0 turns
    the check off) and `download_rate_window` (seconds that the rate is
    averaged over).
    """

    name: str
    source: Literal["digits", "folder", "table", "archive"]
    path: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    url: str | None = None
    sha256: str | None = None
    allow_unverified: bool = False
    subdir: str | None = None
    cache_dir: str = ".dvc/tmp/downloads"
    max_bytes: int = field(default=10 * 1024**3, **_bounds(min=1))
    max_members: int = field(default=1_000_000, **_bounds(min=1))
    max_download_seconds: float | None = field(default=None, **_bounds(above=0))
    min_download_rate: int = field(default=1024, **_bounds(min=0))
    download_rate_window: float = field(default=60.0, **_bounds(above=0))


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: list[int] = field(**_bounds(min=1))
    color_mode: Literal["grayscale", "rgb"] = "grayscale"
    resize: Literal["stretch", "pad", "crop"] = "stretch"
    background: list[int] = field(
        default_factory=lambda: [255, 255, 255], **_bounds(min=0, max=255)
    )
    max_pixels: int = field(default=89_478_485, **_bounds(min=1))
    shard_size: int = field(default=4096, **_bounds(min=1))
    workers: int = field(default=0, **_bounds(min=0))
    on_error: Literal["skip", "fail"] = "skip"
    min_images_per_class: int = field(default=3, **_bounds(min=1))


@dataclass(frozen=True)
class SplitConfig:
    """Split fractions and seed. `label_conflicts` decides what happens to
    identical images filed under different labels: drop them from every
    split, keep them all, or fail."""

    train: float = field(**_bounds(above=0, max=1))
    val: float = field(**_bounds(min=0, max=1))
    test: float = field(**_bounds(above=0, max=1))
    seed: int = 42
    label_conflicts: Literal["drop", "keep", "fail"] = "drop"


# Width multipliers for which Keras publishes ImageNet weights of MobileNetV2.
MOBILENET_V2_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
MIN_BACKBONE_SIZE = 32  # Keras Applications reject smaller inputs


@dataclass(frozen=True)
class FineTuneConfig:
    """Second training phase of a pretrained backbone: `layers` = 0 skips it."""

    layers: int = field(default=0, **_bounds(min=0))
    epochs: int = field(default=0, **_bounds(min=0))
    learning_rate: float = field(default=1e-5, **_bounds(above=0))


@dataclass(frozen=True)
class ModelConfig:
    """Architecture: a CNN built from `filters`, or a Keras Applications backbone.

    The CNN reads filters, convs_per_block, kernel_size, batch_norm and
    dense_units. Backbones read weights, alpha (mobilenet_v2 only) and
    fine_tune. Both read input_size and dropout.
    """

    name: str
    architecture: Literal["cnn", "mobilenet_v2", "efficientnet_b0", "resnet50"] = "cnn"
    filters: list[int] = field(default_factory=list, **_bounds(min=1))
    convs_per_block: int = field(default=1, **_bounds(min=1))
    kernel_size: int = field(default=3, **_bounds(min=1))
    batch_norm: bool = False
    dense_units: list[int] = field(default_factory=list, **_bounds(min=1))
    dropout: float = field(default=0.0, **_bounds(min=0, below=1))
    input_size: list[int] | None = field(default=None, **_bounds(min=1))
    weights: str = "none"
    alpha: float = field(default=1.0, **_bounds(above=0))
    # A mapping checked against FineTuneConfig, then stored as one.
    fine_tune: FineTuneConfig | dict = field(default_factory=FineTuneConfig)

    def __post_init__(self) -> None:
        if isinstance(self.fine_tune, dict):
            fine_tune = _nested(FineTuneConfig, self.fine_tune)
            object.__setattr__(self, "fine_tune", fine_tune)


@dataclass(frozen=True)
class AugmentConfig:
    """Random changes to training images. A factor of 0 (or flip: none) turns one off.

    Factors are fractions: rotation of a full turn, zoom and translation of
    the image size, contrast and brightness of the pixel range.
    """

    name: str
    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = "none"
    rotation: float = field(default=0.0, **_bounds(min=0, max=0.5))
    zoom: float = field(default=0.0, **_bounds(min=0, below=1))
    translation: float = field(default=0.0, **_bounds(min=0, below=1))
    contrast: float = field(default=0.0, **_bounds(min=0, max=1))
    brightness: float = field(default=0.0, **_bounds(min=0, max=1))


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """Early stopping of each phase, which then keeps its best weights.

    A phase ends once `monitor` has not improved by `min_delta` for
    `patience` epochs.
    """

    enabled: bool = False
    monitor: Literal["val_loss", "val_accuracy", "train_loss", "train_accuracy"] = (
        "val_loss"
    )
    patience: int = field(default=5, **_bounds(min=1))
    min_delta: float = field(default=0.0, **_bounds(min=0))


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = field(**_bounds(min=1))
    batch_size: int = field(**_bounds(min=1))
    optimizer: Literal["adam", "sgd", "adamw"]
    learning_rate: float = field(**_bounds(above=0))
    momentum: float = field(default=0.9, **_bounds(min=0, below=1))
    nesterov: bool = False
    weight_decay: float = field(default=1e-4, **_bounds(min=0))
    clipnorm: float | None = field(default=None, **_bounds(above=0))
    lr_schedule: Literal["constant", "step", "cosine"] = "constant"
    warmup_epochs: int = field(default=0, **_bounds(min=0))
    decay_rate: float = field(default=0.1, **_bounds(above=0, max=1))
    decay_epochs: int = field(default=10, **_bounds(min=1))
    label_smoothing: float = field(default=0.0, **_bounds(min=0, below=1))
    class_weight: Literal["none", "balanced"] = "none"
    # A mapping checked against EarlyStoppingConfig, then stored as one.
    early_stopping: EarlyStoppingConfig | dict = field(
        default_factory=EarlyStoppingConfig
    )
    seed: int = 42
    deterministic: bool = False
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"] = "auto"
    strategy: Literal["auto", "default", "mirrored", "multi_worker"] = "auto"
    jit_compile: bool = False
    cache_mb: int = field(default=1024, **_bounds(min=0))

    def __post_init__(self) -> None:
        if isinstance(self.early_stopping, dict):
            stopping = _nested(EarlyStoppingConfig, self.early_stopping)
            object.__setattr__(self, "early_stopping", stopping)


def _nested(schema: type, values: dict[str, Any]) -> Any:
    """Build a nested config dataclass from an already validated mapping."""
    hints = typing.get_type_hints(schema)
    return schema(
        **{k: float(v) if hints[k] is float else v for k, v in values.items()}
    )


@dataclass(frozen=True)
class EvaluateConfig:
    top_k: int = field(default=3, **_bounds(min=1))


# Length of the name column of MLflow's registered_models table (mlflow 3.17.2).
MAX_REGISTERED_MODEL_NAME = 256


@dataclass(frozen=True)
class TrackingConfig:
    """Where runs go. A server URI is checked within `connect_timeout` seconds.
    With `offline_fallback`, an unreachable server makes the stage log to the
    local store, and `python -m stages.upload` copies the runs later."""

    uri: str | None = None
    experiment_name: str = "image-classification"
    run_name: str | None = None
    log_model: bool = True
    register_model: str | None = None
    system_metrics: bool = False
    offline_fallback: bool = False
    connect_timeout: float = field(default=3.0, **_bounds(above=0))


SECTIONS: dict[str, type] = {
    "dataset": DatasetConfig,
    "preprocess": PreprocessConfig,
    "split": SplitConfig,
    "model": ModelConfig,
    "augment": AugmentConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "tracking": TrackingConfig,
}


@dataclass(frozen=True)
class Params:
    """The validated sections a stage asked for; the others are None."""

    raw: dict[str, Any]
    dataset: DatasetConfig | None = None
    preprocess: PreprocessConfig | None = None
    split: SplitConfig | None = None
    model: ModelConfig | None = None
    augment: AugmentConfig | None = None
    train: TrainConfig | None = None
    evaluate: EvaluateConfig | None = None
    tracking: TrackingConfig | None = None


def find_root(start: Path | None = None) -> Path:
    """Return the project root: the nearest folder upwards that contains conf/."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / CONF_DIR / f"{CONFIG_NAME}.yaml").is_file():
            return folder
    raise ConfigError(
        f"No {CONF_DIR}/{CONFIG_NAME}.yaml found in {start} or its parents; "
        "run the stage from the project folder."
    )


def _describe_type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe_type(a) for a in args)
    if origin is list:
        return f"a list of {_describe_type(args[0])}"
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
    }
    return names.get(
        annotation, "null" if annotation is type(None) else str(annotation)
    )


def _check_type(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return value in args
    if origin in (types.UnionType, typing.Union):
        return any(_check_type(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_check_type(v, args[0]) for v in value)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _check_bounds(value: Any, limits: dict[str, float]) -> str | None:
    values = value if isinstance(value, list) else [value]
    for item in values:
        if item is None or not isinstance(item, (int, float)):
            continue
        if not math.isfinite(item):
            return "must be a finite number"
        if "min" in limits and item < limits["min"]:
            return f"must be at least {limits['min']}"
        if "above" in limits and item <= limits["above"]:
            return f"must be greater than {limits['above']}"
        if "max" in limits and item > limits["max"]:
            return f"must be at most {limits['max']}"
        if "below" in limits and item >= limits["below"]:
            return f"must be less than {limits['below']}"
    return None


def _validate_section(name: str, values: Any, schema: type) -> list[str]:
    if not isinstance(values, dict):
        return [f"{name}: expected a mapping of keys to values, got {values!r}"]
    problems = []
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(
                f"{name}.{key}: unknown key{hint}; allowed keys: {', '.join(fields)}"
            )
    for key, spec in fields.items():
        required = (
            spec.default is dataclasses.MISSING
            and spec.default_factory is dataclasses.MISSING
        )
        if key not in values or values[key] == MISSING:
            if required or values.get(key) == MISSING:
                problems.append(
                    f"{name}.{key}: required value is missing; set it with "
                    f"{name}.{key}=<{_describe_type(hints[key])}>"
                )
            continue
        value = values[key]
        if not _check_type(value, hints[key]):
            problems.append(
                f"{name}.{key}: invalid value {value!r}; "
                f"expected {_describe_type(hints[key])}"
            )
            continue
        limit_problem = _check_bounds(value, dict(spec.metadata))
        if limit_problem:
            problems.append(f"{name}.{key}: invalid value {value!r}; {limit_problem}")
    return problems


def _validate_dataset_sources(dataset: dict[str, Any]) -> list[str]:
    """Check the keys that the selected dataset.source needs.

    A "???" value is not reported here, because _validate_section reports it.
    """
    source = dataset.get("source")
    problems = []
    if source in ("folder", "table") and dataset.get("path") in (None, ""):
        example = "/path/to/images" if source == "folder" else "/path/to/labels.csv"
        problems.append(
            f"dataset.path: required when dataset.source is '{source}'; "
            f"set dataset.path={example}"
        )
    if source == "table":
        for key in ("image_column", "label_column"):
            if key in dataset and dataset[key] in (None, ""):
                problems.append(
                    f"dataset.{key}: must name a column of the table, "
                    f"e.g. dataset.{key}={key.removesuffix('_column')}"
                )
    if source == "archive":
        problems += _validate_archive_keys(dataset)
    elif dataset.get("url") not in (None, MISSING):
        problems.append(
            f"dataset.url: used only when dataset.source is 'archive', but the "
            f"source is {source!r}; remove dataset.url or set dataset=archive"
        )
    return problems


def _validate_archive_keys(dataset: dict[str, Any]) -> list[str]:
    """Check url, path, sha256 and subdir for dataset.source 'archive'."""
    problems = []
    url, sha256, subdir = (dataset.get(k) for k in ("url", "sha256", "subdir"))
    if url in (None, ""):
        problems.append(
            "dataset.url: required when dataset.source is 'archive'; set "
            "dataset.url=https://example.com/images.tgz or a local path"
        )
    elif isinstance(url, str) and url != MISSING:
        problems += _validate_archive_url(url)
    if dataset.get("path") not in (None, MISSING):
        problems.append(
            "dataset.path: not used when dataset.source is 'archive'; give the "
            "archive's URL or local path as dataset.url and set dataset.path=null"
        )
    if sha256 is None and dataset.get("allow_unverified") is not True:
        problems.append(
            "dataset.sha256: required when dataset.source is 'archive'; set "
            "dataset.sha256=<64 hex digits, as printed by `sha256sum ARCHIVE`>, "
            "or set dataset.allow_unverified=true to download once and log the hash"
        )
    if isinstance(sha256, str) and sha256 != MISSING and not _is_sha256(sha256):
        problems.append(
            f"dataset.sha256: invalid value {sha256!r}; expected 64 hexadecimal "
            "digits, as printed by `sha256sum ARCHIVE`"
        )
    if isinstance(subdir, str) and not _is_inner_path(subdir):
        problems.append(
            f"dataset.subdir: invalid value {subdir!r}; expected a relative "
            "folder path inside the archive, e.g. dataset.subdir=flower_photos"
        )
    return problems


def _validate_archive_url(url: str) -> list[str]:
    """Check the host part of dataset.url without echoing a password."""
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number
    except ValueError:
        # The value is not shown: a password containing '/' or '#' ends the
        # host part early and would then be printed in full.
        return [
            "dataset.url: invalid host part; expected http(s)://HOST[:PORT]/PATH "
            "with a numeric port, or a local path"
        ]
    if "@" not in parts.netloc:
        return []
    # urllib sends no credentials from a URL: it looks up 'user:password@host'
    # as the host name, so the password would reach the DNS server.
    host = parts.netloc.rpartition("@")[2]
    masked_url = f"{parts.scheme}://***@{host}{parts.path}"
    return [
        f"dataset.url: contains a user name or password before the host "
        f"({masked_url}), which downloads do not support and params.yaml would "
        "keep in git; remove it. For an archive behind a login, download it "
        "yourself (for example with `curl --netrc -O URL`) and set "
        "dataset.url to the path of the downloaded file"
    ]


def _is_sha256(text: str) -> bool:
    """Tell whether `text` is 64 hexadecimal digits."""
    return len(text) == 64 and set(text.lower()) <= set("0123456789abcdef")


def _is_inner_path(path: str) -> bool:
    """Tell whether `path` is relative and has no '..' component."""
    parts = path.replace("\\", "/").split("/")
    return not parts[0].endswith(":") and parts[0] != "" and ".." not in parts


def _validate_fine_tune(model: dict[str, Any]) -> list[str]:
    """Check model.fine_tune against FineTuneConfig and the starting weights."""
    fine_tune = model.get("fine_tune", {})
    if not isinstance(fine_tune, dict):
        return []  # the type problem is reported with the model section
    problems = _validate_section("model.fine_tune", fine_tune, FineTuneConfig)
    layers, epochs = fine_tune.get("layers", 0), fine_tune.get("epochs", 0)
    if not isinstance(layers, int) or layers == 0:
        return problems
    if epochs == 0:
        problems.append(
            "model.fine_tune.epochs: must be at least 1 when "
            f"model.fine_tune.layers is {layers}; or set model.fine_tune.layers=0"
        )
    if model.get("architecture", "cnn") == "cnn":
        problems.append(
            "model.fine_tune.layers: the cnn trains every layer from the start; "
            "fine-tuning needs a backbone such as model=mobilenet_v2"
        )
    elif model.get("weights", "none") == "none":
        problems.append(
            "model.fine_tune.layers: with model.weights=none the whole backbone "
            "trains from the first epoch; set it to 0, or start from "
            "model.weights=imagenet or a local weights file"
        )
    return problems


def _validate_backbone(model: dict[str, Any]) -> list[str]:
    """Check the weights, input size and width of a Keras Applications backbone."""
    problems = []
    architecture = model["architecture"]
    weights = model.get("weights", "none")
    if isinstance(weights, str) and weights not in ("imagenet", "none"):
        if not weights.endswith(".h5"):
            problems.append(
                f"model.weights: invalid value {weights!r}; expected imagenet, none "
                "or a local weights file, e.g. model.weights=/path/to/file.weights.h5"
            )
    size = model.get("input_size")
    if isinstance(size, list) and len(size) == 2 and min(size) < MIN_BACKBONE_SIZE:
        problems.append(
            f"model.input_size: invalid value {size!r}; {architecture} needs "
            f"at least {MIN_BACKBONE_SIZE} pixels in each dimension"
        )
    alpha = model.get("alpha", 1.0)
    if architecture == "mobilenet_v2" and weights == "imagenet":
        if alpha not in MOBILENET_V2_ALPHAS:
            allowed = ", ".join(str(a) for a in MOBILENET_V2_ALPHAS)
            problems.append(
                f"model.alpha: invalid value {alpha!r}; ImageNet weights of "
                f"mobilenet_v2 exist for alpha {allowed}"
            )
    return problems


def _validate_model(model: dict[str, Any]) -> list[str]:
    """Check the model keys that depend on the architecture."""
    problems = _validate_fine_tune(model)
    size = model.get("input_size")
    if isinstance(size, list) and len(size) != 2:
        problems.append(
            f"model.input_size: invalid value {size!r}; expected [height, width]"
        )
    if model.get("architecture", "cnn") != "cnn":
        return problems + _validate_backbone(model)
    if not model.get("filters"):
        problems.append("model.filters: needs at least one block, e.g. [32, 64]")
    if model.get("weights", "none") != "none":
        problems.append(
            f"model.weights: invalid value {model['weights']!r}; the cnn starts "
            "from random weights, so only 'none' is allowed"
        )
    return problems


def _validate_train(train: dict[str, Any]) -> list[str]:
    """Check the training keys that depend on each other."""
    problems = []
    stopping = train.get("early_stopping", {})
    if isinstance(stopping, dict):
        problems += _validate_section(
            "train.early_stopping", stopping, EarlyStoppingConfig
        )
    warmup, epochs = train.get("warmup_epochs", 0), train.get("epochs")
    numbers = all(isinstance(v, int) for v in (warmup, epochs))
    if numbers and warmup > 0 and warmup >= epochs:
        problems.append(
            f"train.warmup_epochs: invalid value {warmup}; must be less than "
            f"train.epochs ({epochs})"
        )
    return problems


def _validate_relations(params: dict[str, Any], sections: list[str]) -> list[str]:
    """Check rules that span several keys of a section."""
    problems = []
    split = params.get("split")
    if "split" in sections and isinstance(split, dict):
        fractions = [split.get(k) for k in ("train", "val", "test")]
        if all(isinstance(f, (int, float)) for f in fractions):
            total = sum(fractions)
            if abs(total - 1.0) > 1e-6:
                problems.append(
                    f"split: train + val + test = {total:g}; the fractions must "
                    "sum to 1 (for example train=0.7 val=0.15 test=0.15)"
                )
    dataset = params.get("dataset")
    if "dataset" in sections and isinstance(dataset, dict):
        problems += _validate_dataset_sources(dataset)
    preprocess = params.get("preprocess")
    if "preprocess" in sections and isinstance(preprocess, dict):
        if len(preprocess.get("image_size") or [0, 0]) != 2:
            problems.append(
                f"preprocess.image_size: invalid value {preprocess['image_size']!r}; "
                "expected [height, width]"
            )
        if len(preprocess.get("background") or [0, 0, 0]) != 3:
            problems.append(
                f"preprocess.background: invalid value {preprocess['background']!r}; "
                "expected [red, green, blue]"
            )
    model = params.get("model")
    if "model" in sections and isinstance(model, dict):
        problems += _validate_model(model)
    train = params.get("train")
    if "train" in sections and isinstance(train, dict):
        problems += _validate_train(train)
    tracking = params.get("tracking")
    if "tracking" in sections and isinstance(tracking, dict):
        problems += _validate_tracking(tracking)
    return problems


def _validate_tracking(tracking: dict[str, Any]) -> list[str]:
    """Check tracking.uri for a password, and tracking.register_model's form and
    that a model is logged for it."""
    problems = []
    uri = tracking.get("uri")
    if isinstance(uri, str) and "://" in uri:
        userinfo, at, _ = uri.split("://", 1)[1].partition("/")[0].rpartition("@")
        # params.yaml is committed to git.
        if at and ":" in userinfo:
            problems.append(
                "tracking.uri: contains a password, which params.yaml would keep "
                "in git; remove it from the URI and set MLFLOW_TRACKING_USERNAME "
                "and MLFLOW_TRACKING_PASSWORD in the environment instead"
            )
    name = tracking.get("register_model")
    if isinstance(name, str):
        problems += _validate_registered_model_name(name)
        if tracking.get("log_model") is False:
            problems.append(
                f"tracking.register_model: {name!r} cannot be registered with "
                "tracking.log_model=false, which logs no model; set "
                "tracking.log_model=true or tracking.register_model=null"
            )
    return problems


def _validate_registered_model_name(name: str) -> list[str]:
    """Check a registered model name against the rules of MLflow's registry.

    The rules are those of mlflow 3.17.2. Its `_validate_model_name` in
    mlflow/utils/validation.py requires a name that is not blank, has no
    '/' or ':', and is unchanged by posixpath.normpath, so it is not '.'
    and does not start with '..'. The file store also rejects '%', and the
    database store keeps names in a column of 256 characters.
    """
    allowed = (
        f"expected 1 to {MAX_REGISTERED_MODEL_NAME} characters, not all "
        "spaces, without '/', ':' or '%', not '.' and not starting with '..', "
        "e.g. tracking.register_model=digits-cnn"
    )
    invalid = (
        not name.strip()
        or len(name) > MAX_REGISTERED_MODEL_NAME
        or any(character in name for character in "/:%")
        or name == "."
        or name.startswith("..")
    )
    if invalid:
        return [f"tracking.register_model: invalid value {name!r}; {allowed}"]
    return []


def validate(params: dict[str, Any], sections: list[str], source: str) -> Params:
    """Validate the named sections of `params` and return them typed.

    Raises:
        ConfigError: listing every problem found, each naming its key.
    """
    problems = []
    for key in params:
        if key not in SECTIONS:
            problems.append(
                f"{key}: unknown section; allowed sections: {', '.join(SECTIONS)}"
            )
    for name in sections:
        if name not in params:
            problems.append(f"{name}: section is missing; run `make params`")
        else:
            problems += _validate_section(name, params[name], SECTIONS[name])
    problems += _validate_relations(params, sections)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"Invalid configuration in {source}:\n{listed}")

    typed = {}
    for name in sections:
        schema = SECTIONS[name]
        hints = typing.get_type_hints(schema)
        values = {
            k: float(v) if hints[k] is float else v for k, v in params[name].items()
        }
        typed[name] = schema(**values)
    return Params(raw=params, **typed)


def _set_key(params: dict[str, Any], dotted: str, value: Any, delete: bool) -> None:
    *parents, leaf = dotted.split(".")
    node = params
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{part}' is not a section, so it has no keys")
    if delete:
        if leaf not in node:
            raise ConfigError(f"{dotted}: cannot delete a key that does not exist")
        del node[leaf]
    else:
        node[leaf] = value


def compose_group(root: Path, group: str, option: str) -> Any:
    """Compose conf/ with one group option selected and return that section."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    options = sorted(p.stem for p in (root / CONF_DIR / group).glob("*.yaml"))
    if option not in options:
        raise ConfigError(
            f"{group}={option}: no option '{option}' in {CONF_DIR}/{group}/; "
            f"available: {', '.join(options)}"
        )
    with initialize_config_dir(str(root / CONF_DIR), version_base=None):
        cfg = compose(config_name=CONFIG_NAME, overrides=[f"{group}={option}"])
    return OmegaConf.to_container(cfg[group], resolve=True)


def apply_overrides(
    params: dict[str, Any], overrides: list[str], root: Path
) -> dict[str, Any]:
    """Apply Hydra-grammar overrides (`a.b=1`, `+a.c=x`, `~a.d`, `group=option`).

    A bare group name (`model=cnn_small`) replaces the whole section with that
    option from conf/, as Hydra would compose it.
    """
    if not overrides:
        return params
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        raise ConfigError(f"Invalid override: {error}") from None
    for override in parsed:
        key = override.key_or_group
        if override.is_sweep_override():
            raise ConfigError(
                f"{override.input_line}: sweeps run through `dvc exp run --queue` "
                "or the sweep command, not a single stage"
            )
        is_group = "." not in key and (root / CONF_DIR / key).is_dir()
        if is_group and not override.is_delete():
            params[key] = compose_group(root, key, str(override.value()))
        else:
            _set_key(params, key, override.value(), override.is_delete())
    return params


def read_params_file(path: Path) -> dict[str, Any]:
    """Read params.yaml, raising ConfigError with the file name on failure."""
    if not path.is_file():
        raise ConfigError(f"{path} not found; create it with `make params`")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {params!r}")
    return params


def load_params(
    sections: list[str],
    overrides: list[str] | None = None,
    params_file: str | os.PathLike[str] | None = None,
) -> Params:
    """Read params.yaml, apply overrides and validate the named sections."""
    root = find_root()
    path = Path(params_file) if params_file else root / PARAMS_FILE
    params = read_params_file(path)
    params = apply_overrides(params, list(overrides or []), root)
    source = str(path) + (f" with overrides {overrides}" if overrides else "")
    from stages.redaction import redact

    source = redact(source)
    return validate(params, sections, source)


def compose_params(root: Path, overrides: list[str], output: Path) -> None:
    """Write the Hydra composition of conf/ to `output` as `dvc exp run` does."""
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(
        output, str(root / CONF_DIR), None, CONFIG_NAME, str(root), overrides
    )


def main() -> None:
    """Regenerate params.yaml from conf/, then validate it."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, key=value")
    parser.add_argument("--output", default=PARAMS_FILE, help="file to write")
    args = parser.parse_args()
    root = find_root()
    output = Path(args.output)
    tmp = output.with_name(f".{output.stem}.tmp{output.suffix}")
    compose_params(root, args.overrides, tmp)
    validate(read_params_file(tmp), list(SECTIONS), str(output))
    os.replace(tmp, output)
    print(f"Wrote {output}")


if __name__ == "__main__":
    main()
