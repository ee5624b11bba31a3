"""What the server, fault, remote, browser and secret tests share.

Services: a test that needs PostgreSQL or Chromium and cannot find it is
skipped with the reason, or fails when REQUIRE_SERVICES=1 (as in CI, where
.ci/run installs and starts them). MLflow servers are started on a free port
of 127.0.0.1 and stopped by the tests themselves.

Projects: `git_copy` makes a git repository of the project's files, as
tests/test_pipeline.py does, and `reproduced_repo` returns a copy in which
`dvc repro` has run with the small CNN for one epoch.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import pytest

from stages import server as mlflow_server
from tests.conftest import ROOT

CHROMIUM = "/usr/bin/chromium"
# The overrides that keep the whole pipeline at about half a minute.
QUICK_PIPELINE = ["model=cnn_small", "train.epochs=1"]


def missing_service(reason: str) -> NoReturn:
    """Skip the test, or fail it when REQUIRE_SERVICES=1."""
    if os.environ.get("REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (REQUIRE_SERVICES=1 requires every service)")
    pytest.skip(reason)


def free_port() -> int:
    """Return a TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """Return the environment for a subprocess: venv first on PATH, no stray
    MLflow or DVC settings, no usage reports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", **extra)
    return env


def run(command: list[str], cwd: Path, **extra_env: str) -> subprocess.CompletedProcess:
    """Run a command; fail the test with its output when it fails."""
    result = subprocess.run(
        command, cwd=cwd, env=clean_env(**extra_env), capture_output=True, text=True
    )
    assert result.returncode == 0, (
        f"{command} failed:\n{result.stdout}\n{result.stderr}"
    )
    return result


def run_python(code: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a new interpreter, whose modules start from none."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True
    )


def stages_run(output: str) -> list[str]:
    """Names of the stages that DVC ran, from its output."""
    lines = output.splitlines()
    return [line.split("'")[1] for line in lines if line.startswith("Running stage")]


def git_copy(folder: Path) -> Path:
    """Copy the project's tracked and new files into `folder` as a git repo."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, folder / name)
    run(["git", "init", "-q"], folder)
    commit_all(folder, "base")
    return folder


def commit_all(repo: Path, message: str) -> None:
    """Commit every change in `repo`."""
    run(["git", "add", "-A"], repo)
    run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message],
        repo,
    )


def configure_quick_pipeline(repo: Path) -> None:
    """Write params.yaml for the small CNN and one epoch, and commit it."""
    run([sys.executable, "-m", "stages.config", *QUICK_PIPELINE], repo)
    commit_all(repo, "quick pipeline")


def shared_repo_path(factory: pytest.TempPathFactory) -> Path:
    """Return where this session keeps its reproduced repository."""
    return factory.getbasetemp() / "reproduced-repo"


def publish_reproduced_repo(repo: Path, factory: pytest.TempPathFactory) -> None:
    """Keep a fully reproduced `repo` for later `reproduced_repo` calls."""
    target = shared_repo_path(factory)
    if not target.exists():
        shutil.copytree(repo, target, symlinks=True, ignore=skip_dvc_tmp)


def reproduced_repo(factory: pytest.TempPathFactory, name: str) -> Path:
    """Return a new git copy of the project in which `dvc repro` has run.

    The first call of a session runs the pipeline; later calls, and calls
    after a test published its reproduced repository, copy that one.
    """
    shared = shared_repo_path(factory)
    if not shared.exists():
        repo = git_copy(factory.mktemp("build") / "repo")
        configure_quick_pipeline(repo)
        run(["dvc", "repro"], repo)
        publish_reproduced_repo(repo, factory)
    copy = factory.mktemp(name) / "repo"
    shutil.copytree(shared, copy, symlinks=True, ignore=skip_dvc_tmp)
    return copy


def skip_dvc_tmp(folder: str, names: list[str]) -> set[str]:
    """Leave out .dvc/tmp (locks and state of the original) when copying."""
    return {"tmp"} & set(names) if Path(folder).name == ".dvc" else set()


class MlflowServer:
    """An `mlflow server` process on 127.0.0.1 that a test starts and stops."""

    def __init__(
        self,
        backend_store_uri: str,
        folder: Path,
        port: int | None = None,
        basic_auth: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.backend_store_uri = backend_store_uri
        self.folder = folder
        self.port = port or free_port()
        self.basic_auth = basic_auth
        self.extra_env = env or {}
        self.log_file = folder / "server.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> None:
        """Start the server and wait until it responds at /health."""
        command = mlflow_server.server_command(
            self.backend_store_uri,
            self.folder / "artifacts",
            port=self.port,
            basic_auth=self.basic_auth,
        )
        env = mlflow_server.server_environment(
            self.folder, self.basic_auth, {**os.environ, **self.extra_env}
        )
        self.process = mlflow_server.start_server(command, env, self.log_file)
        mlflow_server.wait_until_ready(
            mlflow_server.health_url("127.0.0.1", self.port),
            self.process,
            self.log_file,
            timeout,
        )

    def stop(self) -> None:
        """Stop the server with SIGTERM (SIGKILL if it does not end)."""
        if self.process is not None:
            mlflow_server.stop_server(self.process)

    def kill(self) -> None:
        """Kill the server and its workers with SIGKILL, as a crash would."""
        if self.process is not None:
            mlflow_server.stop_server(self.process, kill=True)


def postgres_admin_uri() -> str:
    """Return the URI used to create test databases (TEST_POSTGRES_URI or the
    current user's role over Debian's socket)."""
    return os.environ.get("TEST_POSTGRES_URI") or mlflow_server.default_backend_uri(
        database="postgres"
    )


def postgres_connection():
    """Connect to PostgreSQL as postgres_admin_uri(), or skip (fail in CI)."""
    try:
        import psycopg
    except ImportError:
        missing_service("psycopg is not installed; run `make setup`")
    admin = postgres_admin_uri()
    try:
        return psycopg.connect(admin, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as error:
        missing_service(
            f"PostgreSQL is not reachable at {admin} ({str(error).strip()}); install "
            "and start it, then run `make db DB_ARGS=--createdb` (docs/team.md)"
        )


@contextmanager
def postgres_database() -> Iterator[str]:
    """Create a fresh PostgreSQL database, yield its URI, then drop it."""
    from psycopg import sql
    from sqlalchemy.engine import make_url

    connection = postgres_connection()
    admin = postgres_admin_uri()
    name = f"mlflow_test_{os.getpid()}_{secrets.token_hex(3)}"
    with connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            url = make_url(admin).set(database=name)
            yield url.render_as_string(hide_password=False)
        finally:
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)
                )
            )


def chromium() -> str:
    """Return Debian's Chromium, or skip (fail in CI) when it is missing."""
    if not os.access(CHROMIUM, os.X_OK):
        missing_service(f"{CHROMIUM} not found; install Debian's chromium package")
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing_service("the playwright package is not installed; run `make setup`")
    return CHROMIUM


def train_outputs(folder: Path) -> dict[str, Path]:
    """Output paths of the train stage under `folder`, keeping their names."""
    from stages.train import OUTPUTS

    return {key: folder / path for key, path in OUTPUTS.items()}


def evaluate_outputs(folder: Path) -> dict[str, Path]:
    """Output paths of the evaluate stage under `folder`, keeping their names."""
    from stages.evaluate import OUTPUTS

    return {key: folder / path for key, path in OUTPUTS.items()}


def train_and_evaluate(
    folder: Path, train_overrides: list[str], tracking_overrides: list[str]
) -> tuple[dict, dict]:
    """Run the train and evaluate stages with outputs under `folder`."""
    from stages.evaluate import evaluate
    from stages.train import train

    trained = train_outputs(folder)
    metrics = train([*train_overrides, *tracking_overrides], outputs=trained)
    evaluation = evaluate(
        tracking_overrides,
        predictions_file=trained["predictions"],
        train_metrics=trained["metrics"],
        history_file=trained["history"],
        outputs=evaluate_outputs(folder),
    )
    return metrics, evaluation


def private_project(source: Path, target: Path) -> Path:
    """Copy a prepared project without its MLflow store and stage outputs."""
    skipped = {"mlflow.db", "mlartifacts", "models", "metrics", "plots", "checkpoints"}
    shutil.copytree(source, target, ignore=lambda folder, names: skipped & set(names))
    return target
