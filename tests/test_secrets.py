"""Secrets: credentials never reach logged params, tags, artifacts or logs."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from stages import offline, tracking
from stages.config import ConfigError, TrackingConfig, load_params
from stages.redaction import (
    MASK,
    RedactingFilter,
    install_log_redaction,
    mask_uri,
    redact,
    redact_config,
    redact_flat,
    strip_credentials,
)
from stages.server import warn_about_exposure
from tests.services import MlflowServer

PASSWORD = "s3cr3t-Passw0rd"
TOKEN = "tok_9f8e7d6c5b4a"


@pytest.fixture
def isolated_tracking(monkeypatch: pytest.MonkeyPatch):
    """Start without a tracking URI that earlier tests exported; afterwards,
    end runs and forget the failover routing that the stages set up."""
    mlflow.set_tracking_uri(None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    while mlflow.active_run():
        mlflow.end_run()
    offline.reset()
    mlflow.set_tracking_uri(None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://user:pass@host:5000", "http://user:***@host:5000"),
        ("postgresql://mlflow:pw@db/mlflow", "postgresql://mlflow:***@db/mlflow"),
        ("https://ghp_AbC123xYz789Token@github.com/x", "https://***@github.com/x"),
        (
            "postgresql://mlflow@/mlflow?host=/var/run/postgresql",
            "postgresql://mlflow@/mlflow?host=/var/run/postgresql",
        ),
        ("db?user=a&password=b&x=1", "db?user=a&password=***&x=1"),
        ("s3://b/k?X-Amz-Credential=abc&y=2", "s3://b/k?X-Amz-Credential=***&y=2"),
        ("store at http://127.0.0.1:5000 ok", "store at http://127.0.0.1:5000 ok"),
    ],
)
def test_secrets_mask_uri(text: str, expected: str) -> None:
    assert mask_uri(text) == expected


def test_secrets_strip_credentials() -> None:
    assert strip_credentials("http://a:b@h:1/x") == "http://h:1/x"


def test_secrets_env_values_masked(monkeypatch) -> None:
    monkeypatch.setenv("MY_API_TOKEN", TOKEN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.setenv("SOME_KEY", "1")
    text = f"token {TOKEN}, password {PASSWORD}, epochs 1"
    assert redact(text) == f"token {MASK}, password {MASK}, epochs 1"


def test_secrets_flat_values_masked(monkeypatch) -> None:
    monkeypatch.setenv("DB_SECRET", PASSWORD)
    flat = {
        "tracking.uri": f"http://u:{PASSWORD}@h",
        "dataset.api_token": "abc123",
        "dataset.url": f"https://h/data.tgz?sig={PASSWORD}",
        "train.epochs": "3",
        "dataset.sha256": "null",
    }
    masked = redact_flat(flat)
    assert masked["tracking.uri"] == f"http://u:{MASK}@h"
    assert masked["dataset.api_token"] == MASK
    assert masked["dataset.url"] == f"https://h/data.tgz?sig={MASK}"
    assert masked["train.epochs"] == "3"
    assert masked["dataset.sha256"] == "null"


def test_secrets_nested_config_masked() -> None:
    config = {"tracking": {"uri": f"http://u:{PASSWORD}@h", "token": "abcd"}}
    assert redact_config(config) == {
        "tracking": {"uri": f"http://u:{MASK}@h", "token": MASK}
    }


def test_secrets_uri_password_rejected(project: Path) -> None:
    with pytest.raises(ConfigError, match="tracking.uri: contains a password"):
        load_params(["tracking"], [f"tracking.uri=http://u:{PASSWORD}@127.0.0.1:5000"])


def test_secrets_log_filter_masks_traceback(monkeypatch) -> None:
    monkeypatch.setenv("MY_TOKEN", TOKEN)
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "uri %s", None, None)
    record.args = (f"http://u:{PASSWORD}@h",)
    try:
        raise RuntimeError(f"failed with {TOKEN}")
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()
    RedactingFilter().filter(record)
    formatted = logging.Formatter().format(record)
    assert PASSWORD not in formatted
    assert TOKEN not in formatted
    assert f"http://u:{MASK}@h" in formatted


def test_secrets_server_warnings(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        warn_about_exposure("0.0.0.0", False, f"postgresql://u:{PASSWORD}@db/m")
    assert "0.0.0.0" in caplog.text
    assert "~/.pgpass" in caplog.text
    assert PASSWORD not in caplog.text


def test_secrets_offline_tags_masked(project: Path) -> None:
    failover = offline.Failover(f"http://admin:{PASSWORD}@127.0.0.1:5000")
    tags = failover.offline_tags(f"failed for http://admin:{PASSWORD}@x", False)
    assert tags[offline.TAG_SERVER] == "http://127.0.0.1:5000"
    assert PASSWORD not in json.dumps(tags)


def params_with_secrets(uri: str) -> dict:
    """A config whose tracking URI carries a password and whose dataset a token."""
    return {
        "dataset": {"name": "digits", "url": f"https://h/x.tgz?token={TOKEN}"},
        "train": {"epochs": 1},
        "tracking": {"uri": uri, "experiment_name": "secrets"},
    }


def assert_no_secret(text: str) -> None:
    assert PASSWORD not in text
    assert TOKEN not in text


def test_secrets_run_contents_masked(
    project: Path, monkeypatch, caplog, isolated_tracking
) -> None:
    monkeypatch.setenv("MY_API_TOKEN", TOKEN)
    params = params_with_secrets(f"http://admin:{PASSWORD}@example.invalid")
    cfg = TrackingConfig(experiment_name="secrets", run_name=f"run {TOKEN}")
    with caplog.at_level(logging.INFO):
        run = tracking.start_training_run(
            params, cfg, {"note": f"uses {TOKEN}"}, project / "none", project / "none"
        )
        with pytest.raises(RuntimeError):
            with tracking.run_status(run.info.run_id):
                raise RuntimeError(f"lost http://admin:{PASSWORD}@example.invalid")
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    stored = client.get_run(run.info.run_id)
    assert_no_secret(json.dumps(stored.data.params))
    assert_no_secret(json.dumps(stored.data.tags))
    assert stored.data.params["tracking.uri"] == f"http://admin:{MASK}@example.invalid"
    assert stored.data.tags["note"] == f"uses {MASK}"
    assert stored.data.tags["error"].endswith(
        f"lost http://admin:{MASK}@example.invalid"
    )
    config = Path(client.download_artifacts(run.info.run_id, "config/params.yaml"))
    assert_no_secret(config.read_text())
    assert yaml.safe_load(config.read_text())["dataset"]["url"].endswith(MASK)
    assert_no_secret(caplog.text)
    assert "MLflow run" in caplog.text


def test_secrets_basic_auth_server(
    tmp_path: Path, project: Path, monkeypatch, caplog, isolated_tracking
) -> None:
    folder = tmp_path / "auth-server"
    server = MlflowServer(
        f"sqlite:///{folder / 'server.db'}",
        folder,
        basic_auth=True,
        env={"MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD},
    )
    folder.mkdir()
    server.start()
    try:
        request = urllib.request.Request(
            f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1"
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
        uri = server.url.replace("http://", f"http://admin:{PASSWORD}@")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with caplog.at_level(logging.INFO):
            install_log_redaction()
            run = tracking.start_training_run(
                params_with_secrets(uri),
                TrackingConfig(experiment_name="secrets"),
                {},
                project / "none",
                project / "none",
            )
            mlflow.end_run()
        stored = MlflowClient(server.url).get_run(run.info.run_id)
        assert_no_secret(json.dumps(stored.data.params))
        assert_no_secret(json.dumps(stored.data.tags))
        assert stored.data.params["tracking.uri"].startswith(f"http://admin:{MASK}@")
        assert f"MLflow store http://admin:{MASK}@127.0.0.1" in caplog.text
        assert_no_secret(caplog.text)
        assert_no_secret(server.log_file.read_text())
    finally:
        server.stop()


def test_stage_log_masks_url_token(capfd) -> None:
    import logging

    from stages.cli import setup_logging
    from stages.redaction import install_log_redaction

    setup_logging()
    install_log_redaction()
    logging.getLogger("stages.archives").info(
        "Downloading http://user:hunter2@127.0.0.1:9/x.tgz?token=supersecret"
    )
    logged = capfd.readouterr().err
    assert "Downloading http://" in logged
    assert "supersecret" not in logged
    assert "hunter2" not in logged
