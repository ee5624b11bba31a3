"""Configuration: params.yaml freshness, validation errors and overrides."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from stages.config import (
    SECTIONS,
    ConfigError,
    compose_params,
    load_params,
    read_params_file,
    validate,
)
from tests.conftest import ROOT


@pytest.fixture
def params() -> dict:
    return read_params_file(ROOT / "params.yaml")


def test_params_file_matches_conf(tmp_path: Path) -> None:
    composed = tmp_path / "params.yaml"
    compose_params(ROOT, [], composed)
    assert composed.read_text() == (ROOT / "params.yaml").read_text(), (
        "params.yaml is stale: run `make params` and commit it"
    )


def test_params_file_is_valid(params: dict) -> None:
    loaded = validate(params, list(SECTIONS), "params.yaml")
    assert loaded.train.learning_rate > 0
    assert set(params) == set(SECTIONS)


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("train", "lerning_rate", 0.1, "did you mean 'learning_rate'"),
        ("train", "epochs", "ten", "expected an integer"),
        ("train", "epochs", True, "expected an integer"),
        ("train", "learning_rate", -0.01, "must be greater than 0"),
        ("train", "optimizer", "rmsprop", "one of 'adam', 'sgd', 'adamw'"),
        ("model", "dropout", 1.0, "must be less than 1"),
        ("model", "filters", [32, "x"], "a list of an integer"),
        ("preprocess", "image_size", [16], "expected [height, width]"),
        ("preprocess", "color_mode", "cmyk", "one of 'grayscale', 'rgb'"),
        ("split", "train", 0.9, "must sum to 1"),
        ("tracking", "log_model", "yes", "expected true or false"),
    ],
)
def test_config_rejects_invalid_value(
    params: dict, section: str, key: str, value, expected: str
) -> None:
    bad = copy.deepcopy(params)
    bad[section][key] = value
    with pytest.raises(ConfigError) as error:
        validate(bad, list(SECTIONS), "params.yaml")
    message = str(error.value)
    assert f"{section}." in message or f"{section}:" in message
    assert expected in message


def test_config_unknown_key_lists_allowed(params: dict) -> None:
    params["train"]["lerning_rate"] = 0.1
    with pytest.raises(ConfigError, match="allowed keys: epochs, batch_size"):
        validate(params, ["train"], "params.yaml")


def test_config_reports_all_problems_at_once(params: dict) -> None:
    params["train"]["learning_rate"] = -1
    params["train"]["epochs"] = 0
    params["split"]["test"] = 0.5
    with pytest.raises(ConfigError) as error:
        validate(params, ["train", "split"], "params.yaml")
    lines = str(error.value).splitlines()
    assert len(lines) == 4
    assert "train.learning_rate" in lines[1] or "train.learning_rate" in lines[2]


def test_config_unknown_section(params: dict) -> None:
    params["trian"] = {"epochs": 1}
    with pytest.raises(ConfigError, match="trian: unknown section"):
        validate(params, ["train"], "params.yaml")


def test_config_missing_required_value(params: dict) -> None:
    params["dataset"] = {"name": "folder", "source": "folder", "path": "???"}
    with pytest.raises(ConfigError, match="dataset.path: required value is missing"):
        validate(params, ["dataset"], "params.yaml")


def test_overrides_change_values(project: Path) -> None:
    loaded = load_params(["train", "model"], ["train.epochs=3", "model=cnn_small"])
    assert loaded.train.epochs == 3
    assert loaded.model.name == "cnn_small"
    assert loaded.model.filters == [16]


def test_overrides_add_and_delete(project: Path) -> None:
    loaded = load_params(["tracking"], ["~tracking.run_name", "+tracking.run_name=x"])
    assert loaded.tracking.run_name == "x"


def test_overrides_list_value(project: Path) -> None:
    loaded = load_params(["model"], ["model.filters=[8,16,32]"])
    assert loaded.model.filters == [8, 16, 32]


def test_overrides_unknown_group_option(project: Path) -> None:
    with pytest.raises(ConfigError, match="available: cnn, cnn_large, cnn_small"):
        load_params(["model"], ["model=resnet"])


def test_overrides_reject_sweep(project: Path) -> None:
    with pytest.raises(ConfigError, match="sweeps run through"):
        load_params(["train"], ["train.epochs=1,2"])


def test_overrides_reject_bad_syntax(project: Path) -> None:
    with pytest.raises(ConfigError, match="Invalid override"):
        load_params(["train"], ["train.epochs=[1"])


def test_load_params_invalid_yaml(project: Path) -> None:
    (project / "params.yaml").write_text("train: [1,\n")
    with pytest.raises(ConfigError, match="params.yaml is not valid YAML"):
        load_params(["train"])


def test_load_params_missing_file(project: Path) -> None:
    (project / "params.yaml").unlink()
    with pytest.raises(ConfigError, match="make params"):
        load_params(["train"])


def test_compose_with_group_override(tmp_path: Path) -> None:
    output = tmp_path / "params.yaml"
    compose_params(ROOT, ["model=cnn_large", "train.epochs=2"], output)
    composed = yaml.safe_load(output.read_text())
    assert composed["model"]["name"] == "cnn_large"
    assert composed["train"]["epochs"] == 2
