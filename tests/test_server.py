"""The team tracking server: PostgreSQL backend, served artifacts, real stages."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from stages import offline
from stages import server as mlflow_server
from tests.conftest import ROOT
from tests.services import (
    MlflowServer,
    postgres_connection,
    postgres_database,
    private_project,
    train_and_evaluate,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def postgres_server(tmp_path_factory):
    """An MLflow server on a fresh PostgreSQL database, with served artifacts."""
    with postgres_database() as backend_uri:
        server = MlflowServer(backend_uri, tmp_path_factory.mktemp("pg-server"))
        server.start()
        yield server
        server.stop()


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


def test_server_command_binds_loopback() -> None:
    command = mlflow_server.server_command("postgresql://u@/db", Path("art"))
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert "--serve-artifacts" in command
    destination = command[command.index("--artifacts-destination") + 1]
    assert destination == str(Path("art").resolve())
    assert "--app-name" not in command


def test_server_command_basic_auth() -> None:
    command = mlflow_server.server_command(
        "sqlite:///x.db", "s3://b/a", basic_auth=True
    )
    assert command[command.index("--app-name") + 1] == "basic-auth"
    assert command[command.index("--artifacts-destination") + 1] == "s3://b/a"


def test_server_basic_auth_needs_password(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    with pytest.raises(ValueError, match="MLFLOW_AUTH_ADMIN_PASSWORD"):
        mlflow_server.server_environment(tmp_path, basic_auth=True)


def test_server_make_target_defaults() -> None:
    dry_run = subprocess.run(
        ["make", "-n", "server"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "--host '127.0.0.1'" in dry_run
    assert "--backend-store-uri 'postgresql://" in dry_run
    assert "--basic-auth" not in dry_run
    with_auth = subprocess.run(
        ["make", "-n", "server", "AUTH=basic", "HOST=0.0.0.0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--basic-auth" in with_auth
    assert "--host '0.0.0.0'" in with_auth


@pytest.mark.skipif(os.geteuid() != 0, reason="creating roles needs root")
def test_server_create_database_twice() -> None:
    role = database = f"mlflow_make_db_{os.getpid()}"
    with postgres_connection() as connection:
        try:
            mlflow_server.create_database(role, database)
            mlflow_server.create_database(role, database)
            owner = connection.execute(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s",
                (database,),
            ).fetchone()
            assert owner == (role,)
        finally:
            subprocess.run(
                [
                    *mlflow_server.superuser_prefix(),
                    "psql",
                    "-X",
                    "-q",
                    "-c",
                    f'DROP DATABASE IF EXISTS "{database}"',
                    "-c",
                    f'DROP ROLE IF EXISTS "{role}"',
                ],
                cwd="/",
                check=True,
            )


def test_server_stages_log_to_postgres(
    digits_project: Path,
    postgres_server: MlflowServer,
    tmp_path: Path,
    monkeypatch,
    isolated_tracking,
) -> None:
    import psycopg

    project = private_project(digits_project, tmp_path / "project")
    monkeypatch.chdir(project)
    tracking = [
        f"tracking.uri={postgres_server.url}",
        "tracking.experiment_name=team-server",
    ]
    metrics, evaluation = train_and_evaluate(
        tmp_path / "outputs", ["model=cnn_small", "train.epochs=1"], tracking
    )

    client = MlflowClient(postgres_server.url)
    run_id = metrics["mlflow_run_id"]
    stored = client.get_run(run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params["train.epochs"] == "1"
    assert stored.data.params["model.name"] == "cnn_small"
    assert stored.data.params["tracking.uri"] == postgres_server.url
    assert stored.data.metrics["test_accuracy"] == pytest.approx(evaluation["accuracy"])
    history = client.get_metric_history(run_id, "val_accuracy")
    assert [m.step for m in history] == [1]

    files = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert "evaluation/confusion_matrix.png" in files
    picture = client.download_artifacts(
        run_id, "evaluation/confusion_matrix.png", str(tmp_path)
    )
    assert Path(picture).read_bytes().startswith(PNG_SIGNATURE)
    served = postgres_server.folder / "artifacts"
    assert list(served.rglob("confusion_matrix.png"))
    (output,) = stored.outputs.model_outputs
    assert client.get_logged_model(output.model_id).status == "READY"

    with psycopg.connect(postgres_server.backend_store_uri) as connection:
        rows = connection.execute(
            "SELECT status FROM runs WHERE run_uuid = %s", (run_id,)
        ).fetchall()
    assert rows == [("FINISHED",)]
    assert not (project / "mlflow.db").exists()
