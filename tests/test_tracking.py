"""MLflow helpers: store location, parameters, key safety, run status, models."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from stages import tracking
from stages.config import ConfigError, TrackingConfig, load_params, validate


def test_tracking_uri_default_at_project_root(project: Path) -> None:
    assert tracking.tracking_uri(TrackingConfig()) == f"sqlite:///{project}/mlflow.db"


def test_tracking_uri_uses_dvc_root(project: Path, tmp_path: Path, monkeypatch) -> None:
    copy = project / ".dvc" / "tmp" / "exps" / "tmp123"
    (copy / "conf").mkdir(parents=True)
    (copy / "conf" / "config.yaml").write_text("defaults: []\n")
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(project))
    assert tracking.tracking_uri(TrackingConfig()) == f"sqlite:///{project}/mlflow.db"


def test_tracking_uri_precedence(project: Path, monkeypatch) -> None:
    cfg = TrackingConfig(uri="http://127.0.0.1:5999")
    assert tracking.tracking_uri(cfg) == "http://127.0.0.1:5999"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/other.db")
    assert tracking.tracking_uri(cfg) == "sqlite:////tmp/other.db"


def test_flatten_nested_sections() -> None:
    flat = tracking.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None})
    assert flat == {"a.b": "1", "a.c.d": "[1, 2]", "e": "null"}


def test_shorten_values_marks_long_values() -> None:
    short = tracking.shorten_values({"k": "x" * (MAX_PARAM_VAL_LENGTH + 10), "s": "ok"})
    assert len(short["k"]) == MAX_PARAM_VAL_LENGTH
    assert short["k"].endswith(tracking.TRUNCATION_MARK)
    assert short["s"] == "ok"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("test_f1.dog@home", "test_f1.dog_home"),
        ("a,b", "a_b"),
        ("crème", "cr_me"),
        ("x [1]", "x _1_"),
        ("ok-name/1.2", "ok-name/1.2"),
    ],
)
def test_sanitize_key(name: str, expected: str) -> None:
    assert tracking.sanitize_key(name) == expected


def test_finite_metrics_drops_nan() -> None:
    kept = tracking.finite_metrics({"a": 1.0, "b": float("nan"), "c": float("inf")})
    assert kept == {"a": 1.0}


def test_run_status_marks_failed(project: Path) -> None:
    tracking.use_experiment(TrackingConfig(experiment_name="status"))
    run = mlflow.start_run()
    with pytest.raises(ValueError, match="boom"):
        with tracking.run_status(run.info.run_id):
            raise ValueError("boom")
    stored = MlflowClient().get_run(run.info.run_id)
    assert stored.info.status == "FAILED"
    assert stored.data.tags["error"] == "ValueError: boom"
    assert mlflow.active_run() is None


def test_run_status_marks_killed(project: Path) -> None:
    tracking.use_experiment(TrackingConfig(experiment_name="status"))
    run = mlflow.start_run()
    with pytest.raises(KeyboardInterrupt):
        with tracking.run_status(run.info.run_id):
            raise KeyboardInterrupt
    assert MlflowClient().get_run(run.info.run_id).info.status == "KILLED"


def test_default_store_puts_artifacts_at_root(project: Path) -> None:
    experiment_id = tracking.use_experiment(TrackingConfig(experiment_name="where"))
    location = mlflow.get_experiment(experiment_id).artifact_location
    assert location == (project / "mlartifacts").as_uri()


# Names that MLflow's registry accepts or rejects, and edge cases of the
# config rule that mirrors it.
REGISTERED_MODEL_NAMES = [
    "digits-cnn",
    "Digits CNN v2.1_β",
    " padded ",
    ".cnn",
    "cnn..v2",
    "cnn.",
    "a\\b",
    "a" * 256,
    "a" * 257,
    "",
    "   ",
    "team/cnn",
    "cnn:v2",
    "100%",
    ".",
    "..",
    "..cnn",
]


def test_register_model_name_as_registry(tmp_path: Path) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.store.model_registry.file_store import (
        _validate_model_name as file_store_rule,
    )

    client = MlflowClient(registry_uri=f"sqlite:///{tmp_path / 'registry.db'}")
    for name in REGISTERED_MODEL_NAMES:
        try:
            client.create_registered_model(name)
            database_accepts = True
        except MlflowException:
            database_accepts = False
        try:
            file_store_rule(name)
            file_store_accepts = True
        except MlflowException:
            file_store_accepts = False
        # SQLite ignores the VARCHAR(256) of the name column; PostgreSQL and
        # MySQL reject longer names.
        expected = database_accepts and file_store_accepts and len(name) <= 256

        params = {"tracking": {"register_model": name}}
        try:
            validate(params, ["tracking"], "params.yaml")
            config_accepts = True
        except ConfigError as error:
            config_accepts = False
            assert "tracking.register_model: invalid value" in str(error)
            assert "without '/', ':' or '%'" in str(error)

        assert config_accepts == expected, repr(name)


def test_register_model_checked_before_training(project: Path) -> None:
    overrides = ["tracking.register_model=team/digits-cnn"]

    with pytest.raises(ConfigError) as error:
        load_params(["model", "augment", "train", "tracking"], overrides)

    assert "tracking.register_model: invalid value 'team/digits-cnn'" in str(
        error.value
    )


def test_register_model_needs_a_logged_model(project: Path) -> None:
    overrides = ["tracking.register_model=digits-cnn", "tracking.log_model=false"]

    with pytest.raises(ConfigError, match="set tracking.log_model=true"):
        load_params(["tracking"], overrides)


def tiny_classifier():
    """Return an untrained Keras model for 4x4 grey images and 3 classes."""
    import keras

    return keras.Sequential(
        [
            keras.Input((4, 4, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


EXAMPLE_IMAGES = np.arange(32, dtype=np.uint8).reshape(2, 4, 4, 1)


def test_log_keras_model_keeps_input_example(project: Path) -> None:
    from mlflow.models import Model

    tracking.use_experiment(TrackingConfig(experiment_name="models"))
    model = tiny_classifier()
    with mlflow.start_run() as run:
        tracking.log_keras_model(model, EXAMPLE_IMAGES)
    uri = f"runs:/{run.info.run_id}/model"

    logged = Model.load(uri)
    assert logged.saved_input_example_info["artifact_path"] == "input_example.json"
    assert logged.saved_input_example_info["type"] == "ndarray"
    example = logged.load_input_example(uri)
    assert example.dtype == np.uint8
    np.testing.assert_array_equal(example, EXAMPLE_IMAGES)
    assert logged.signature.inputs.inputs[0].shape == (-1, 4, 4, 1)

    probabilities = np.asarray(mlflow.pyfunc.load_model(uri).predict(example))
    expected = model.predict(EXAMPLE_IMAGES, verbose=0)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5)
    assert not MlflowClient().list_artifacts(run.info.run_id, "model_input")


def test_log_keras_model_registers_version(project: Path) -> None:
    from mlflow.models import Model

    tracking.use_experiment(TrackingConfig(experiment_name="models"))
    with mlflow.start_run() as run:
        tracking.log_keras_model(tiny_classifier(), EXAMPLE_IMAGES, "tiny-cnn")

    (version,) = MlflowClient().search_model_versions("name = 'tiny-cnn'")
    assert version.run_id == run.info.run_id
    uri = f"models:/tiny-cnn/{version.version}"
    example = Model.load(uri).load_input_example(uri)
    np.testing.assert_array_equal(example, EXAMPLE_IMAGES)
    assert np.asarray(mlflow.pyfunc.load_model(uri).predict(example)).shape == (2, 3)


def test_sqlite_store_created_concurrently(tmp_path: Path) -> None:
    """Four processes that open one new SQLite store at once all succeed."""
    import subprocess
    import sys

    database = tmp_path / "mlflow.db"
    start = tmp_path / "start"
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from stages import tracking\n"
        "from stages.config import TrackingConfig\n"
        "import mlflow.store.tracking.sqlalchemy_store\n"
        f"while not Path({str(start)!r}).exists():\n"
        "    time.sleep(0.01)\n"
        f"cfg = TrackingConfig(uri='sqlite:///{database}', experiment_name='shared')\n"
        "print(tracking.use_experiment(cfg))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(4)
    ]
    start.touch()
    results = [process.communicate(timeout=120) for process in processes]
    for process, (_, stderr) in zip(processes, results, strict=True):
        assert process.returncode == 0, stderr[-2000:]
    experiment_ids = {stdout.split()[-1] for stdout, _ in results}
    assert len(experiment_ids) == 1
    assert (tmp_path / ".mlflow.db.lock").is_file()
