"""Faults: an unreachable or dying tracking server, killed stages, a full disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import mlflow
import psutil
import pytest
from mlflow.tracking import MlflowClient

from stages import offline, tracking
from stages.config import TrackingConfig
from stages.fsutil import DiskFullError, write_text
from tests.services import (
    MlflowServer,
    clean_env,
    configure_quick_pipeline,
    evaluate_outputs,
    free_port,
    git_copy,
    private_project,
    publish_reproduced_repo,
    run,
    stages_run,
    train_outputs,
)

# Long enough that the server dies while epochs are still running.
KILLED_SERVER_EPOCHS = 20
STAGES = ("download", "preprocess", "split", "train", "evaluate")
OUTPUT_FOLDERS = ("data", "models", "metrics", "plots")


@pytest.fixture(autouse=True)
def isolated_tracking(monkeypatch: pytest.MonkeyPatch):
    """Start without, and undo, the process-wide MLflow settings of stages.

    mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which earlier tests
    may have left behind and which would override tracking.uri.
    """
    mlflow.set_tracking_uri(None)
    names = [*offline.FAST_FAILURE_ENV, "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"]
    for name in [*names, "MLFLOW_TRACKING_URI"]:
        monkeypatch.delenv(name, raising=False)
    yield
    while mlflow.active_run():
        mlflow.end_run()
    offline.reset()
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def offline_project(digits_project: Path, tmp_path_factory) -> Path:
    """The prepared digits project with an empty MLflow store of its own."""
    return private_project(digits_project, tmp_path_factory.mktemp("faults") / "p")


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory):
    """An MLflow server with a SQLite store, which tests may kill and restart."""
    folder = tmp_path_factory.mktemp("fault-server")
    server = MlflowServer(f"sqlite:///{folder / 'server.db'}", folder)
    server.start()
    yield server
    server.stop()


def server_client(url: str) -> MlflowClient:
    """Return a client that talks to the server directly, as a teammate would."""
    offline.reset()
    return MlflowClient(url)


def test_unreachable_server_fails_fast() -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(offline.TrackingUnavailableError) as raised:
        tracking.use_experiment(TrackingConfig(uri=uri))
    assert time.monotonic() - started < 5
    message = str(raised.value)
    assert uri in message
    assert "make server" in message
    assert "tracking.offline_fallback=true" in message
    assert "tracking.uri" in message


def test_unreachable_server_stops_train_stage(offline_project: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    command = [
        sys.executable,
        "-m",
        "stages.train",
        "model=cnn_small",
        "train.epochs=1",
        f"tracking.uri={uri}",
    ]
    result = subprocess.run(
        command, cwd=offline_project, env=clean_env(), capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr
    assert f"MLflow tracking server {uri} is not reachable" in result.stderr
    assert "tracking.offline_fallback=true" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Epoch 1/" not in result.stdout + result.stderr
    assert not (offline_project / "models" / "model.keras").exists()


def test_fallback_run_uploads_later(
    offline_project: Path,
    fault_server: MlflowServer,
    tmp_path: Path,
    monkeypatch,
    caplog,
) -> None:
    from stages.evaluate import evaluate
    from stages.train import train

    monkeypatch.chdir(offline_project)
    fault_server.stop()
    tracking_overrides = [
        f"tracking.uri={fault_server.url}",
        "tracking.offline_fallback=true",
        "tracking.experiment_name=fallback",
    ]
    outputs = train_outputs(tmp_path)
    with caplog.at_level(logging.WARNING):
        metrics = train(
            ["model=cnn_small", "train.epochs=1", *tracking_overrides], outputs=outputs
        )
    assert f"MLflow tracking server {fault_server.url} is not reachable" in caplog.text
    assert "offline_fallback" in caplog.text

    local_id = metrics["mlflow_run_id"]
    local_client = MlflowClient(f"sqlite:///{offline_project / 'mlflow.db'}")
    local = local_client.get_run(local_id)
    assert local.data.tags[offline.TAG_FALLBACK] == "true"
    assert local.data.tags[offline.TAG_STATE] == offline.PENDING
    assert local.data.tags[offline.TAG_SERVER] == fault_server.url
    assert local.data.params["train.epochs"] == "1"

    # Back before the upload: evaluate still logs to the local run.
    fault_server.start()
    offline.reset()
    evaluation = evaluate(
        tracking_overrides,
        predictions_file=outputs["predictions"],
        train_metrics=outputs["metrics"],
        history_file=outputs["history"],
        outputs=evaluate_outputs(tmp_path),
    )
    local = local_client.get_run(local_id)
    assert local.data.metrics["test_accuracy"] == pytest.approx(evaluation["accuracy"])
    client = server_client(fault_server.url)
    experiment = client.get_experiment_by_name("fallback")
    assert client.search_runs([experiment.experiment_id]) == []

    run([sys.executable, "-m", "stages.upload", "--uri", fault_server.url], Path.cwd())
    (uploaded,) = client.search_runs([experiment.experiment_id])
    assert uploaded.data.tags["offline.local_run_id"] == local_id
    assert uploaded.info.status == "FINISHED"
    assert uploaded.data.params["model.name"] == "cnn_small"
    assert uploaded.data.metrics["test_accuracy"] == pytest.approx(
        evaluation["accuracy"]
    )
    history = client.get_metric_history(uploaded.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1]
    files = {a.path for a in client.list_artifacts(uploaded.info.run_id, "evaluation")}
    assert "evaluation/confusion_matrix.png" in files
    tags = local_client.get_run(local_id).data.tags
    assert tags[offline.TAG_STATE] == offline.UPLOADED
    assert tags[offline.TAG_SERVER_RUN] == uploaded.info.run_id


class ServerKiller(threading.Thread):
    """Kill the server once the first epoch of a run in `experiment` reached it."""

    def __init__(self, server: MlflowServer, experiment: str) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.experiment = experiment
        self.epochs_on_server = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        from mlflow.entities import ViewType
        from mlflow.store.tracking.rest_store import RestStore
        from mlflow.utils.credentials import get_default_host_creds

        # A plain RestStore, so the stage's failover routing plays no part.
        store = RestStore(partial(get_default_host_creds, self.server.url))
        deadline = time.monotonic() + 600
        try:
            while time.monotonic() < deadline:
                experiment = store.get_experiment_by_name(self.experiment)
                if experiment is not None:
                    ids = [experiment.experiment_id]
                    for found in store.search_runs(ids, "", ViewType.ALL, 10):
                        history = store.get_metric_history(
                            found.info.run_id, "val_loss"
                        )
                        if history:
                            self.epochs_on_server = len(history)
                            self.server.kill()
                            return
                time.sleep(0.1)
        except BaseException as error:  # reported by the test
            self.error = error


def test_server_killed_mid_training(
    offline_project: Path,
    fault_server: MlflowServer,
    tmp_path: Path,
    monkeypatch,
    caplog,
) -> None:
    from stages.evaluate import evaluate
    from stages.train import train

    monkeypatch.chdir(offline_project)
    killer = ServerKiller(fault_server, "killed-server")
    killer.start()
    outputs = train_outputs(tmp_path)
    overrides = [
        "model=cnn_small",
        f"train.epochs={KILLED_SERVER_EPOCHS}",
        f"tracking.uri={fault_server.url}",
        "tracking.experiment_name=killed-server",
        "tracking.register_model=digits-cnn",
    ]
    with caplog.at_level(logging.WARNING):
        metrics = train(overrides, outputs=outputs)
    killer.join(timeout=30)
    assert killer.error is None
    assert 1 <= killer.epochs_on_server < KILLED_SERVER_EPOCHS
    assert "Lost the MLflow tracking server" in caplog.text
    assert outputs["model"].is_file()
    assert json.loads(outputs["metrics"].read_text())["epochs"] == KILLED_SERVER_EPOCHS

    run_id = metrics["mlflow_run_id"]
    ((local_run, copy),) = offline.pending_copies()
    assert copy.caller_id == run_id
    assert local_run.data.tags[offline.TAG_STATE] == offline.PENDING

    # The evaluate stage, as a new process would, finds the local copy.
    offline.reset()
    evaluation = evaluate(
        [*overrides[2:4], "tracking.offline_fallback=true"],
        predictions_file=outputs["predictions"],
        train_metrics=outputs["metrics"],
        history_file=outputs["history"],
        outputs=evaluate_outputs(tmp_path),
    )

    fault_server.start()
    client = server_client(fault_server.url)
    assert client.get_run(run_id).info.status == "RUNNING"
    history = client.get_metric_history(run_id, "val_loss")
    assert len(history) < KILLED_SERVER_EPOCHS

    run([sys.executable, "-m", "stages.upload"], offline_project)
    stored = client.get_run(run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params["train.epochs"] == str(KILLED_SERVER_EPOCHS)
    assert "train_seconds" in stored.data.metrics
    assert stored.data.metrics["test_accuracy"] == pytest.approx(evaluation["accuracy"])
    assert "offline.state" not in stored.data.tags
    steps = [m.step for m in client.get_metric_history(run_id, "val_loss")]
    assert sorted(steps) == list(range(1, KILLED_SERVER_EPOCHS + 1))
    assert {a.path for a in client.list_artifacts(run_id, "config")} >= {
        "config/params.yaml"
    }
    (output,) = stored.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.status == "READY"
    assert model.source_run_id == run_id
    model_files = {a.path for a in client.list_logged_model_artifacts(model.model_id)}
    assert "MLmodel" in model_files
    assert "input_example.json" in model_files
    (version,) = client.search_model_versions("name = 'digits-cnn'")
    assert version.run_id == run_id
    assert not offline.pending_copies()


def stage_process(repo: Path, stage: str) -> psutil.Process | None:
    """Return the running `python -m stages.<stage>` process of `repo`."""
    for process in psutil.process_iter(["cmdline", "cwd"]):
        cmdline = process.info["cmdline"] or []
        cwd = process.info["cwd"]
        if f"stages.{stage}" in cmdline and cwd and Path(cwd) == repo.resolve():
            return process
    return None


def temporary_outputs(repo: Path, pid: int) -> list[Path]:
    """Temporary siblings of outputs that process `pid` is writing."""
    mark = f".tmp-{pid}"
    return [
        path
        for folder in OUTPUT_FOLDERS
        if (repo / folder).is_dir()
        for path in (repo / folder).iterdir()
        if path.name.startswith(".") and mark in path.name
    ]


def final_path(temporary: Path, pid: int) -> Path:
    """Return the output that a temporary sibling of process `pid` replaces.

    Folders are written as `.NAME.tmp-PID`, files as `.STEM.tmp-PID.SUFFIX`.
    """
    stem, _, suffix = temporary.name[1:].partition(f".tmp-{pid}")
    return temporary.with_name(stem + suffix)


def output_digests(repo: Path) -> dict[Path, str]:
    """Return a digest of each file and folder in the output folders."""
    digests = {}
    for folder in OUTPUT_FOLDERS:
        if (repo / folder).is_dir():
            for path in (repo / folder).iterdir():
                if path.is_dir():
                    digests[path] = tree_digest(path)
                else:
                    digests[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def repro_and_kill(repo: Path, stage: str, point: str) -> tuple[str, list[Path]]:
    """Run `dvc repro` and SIGKILL `stage` early or while it writes an output.

    Returns DVC's output and the outputs that were being written at the kill.
    """
    dvc = subprocess.Popen(
        ["dvc", "repro"],
        cwd=repo,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[Path] = []
    deadline = time.monotonic() + 300
    target = None
    while target is None and dvc.poll() is None and time.monotonic() < deadline:
        target = stage_process(repo, stage)
        time.sleep(0.01)
    assert target is not None, f"stage {stage} never started:\n{dvc.communicate()[0]}"
    if point == "early":
        time.sleep(0.3)
    while point == "writing" and target.is_running():
        if temporary_outputs(repo, target.pid):
            # Stopped, the stage cannot rename what it is writing before the kill.
            target.suspend()
            seen = temporary_outputs(repo, target.pid)
            if seen:
                break
            target.resume()
        time.sleep(0.005)
    assert target.is_running(), f"stage {stage} ended before the kill"
    target.kill()
    output = dvc.communicate(timeout=120)[0]
    assert dvc.returncode != 0, output
    return output, [final_path(path, target.pid) for path in seen]


@pytest.mark.slow
def test_killed_stage_never_up_to_date(tmp_path_factory) -> None:
    repo = git_copy(tmp_path_factory.mktemp("killed") / "repo")
    configure_quick_pipeline(repo)
    previous = None
    for stage in STAGES:
        for point in ("early", "writing"):
            before = output_digests(repo)
            output, written = repro_and_kill(repo, stage, point)
            assert stage in stages_run(output)
            if previous is not None:
                assert previous in stages_run(output), f"{previous} was not re-run"
            if point == "writing":
                assert written, f"no temporary output of {stage} seen"
            after = output_digests(repo)
            for path in written:
                # Absent, or the version from git, never a partial file.
                assert after.get(path) == before.get(path), f"{path} changed"
            status = run(["dvc", "status", stage], repo).stdout
            assert "up to date" not in status
            assert f"{stage}:" in status
            previous = stage
    final_run = run(["dvc", "repro"], repo)
    assert stages_run(final_run.stdout + final_run.stderr) == ["evaluate"]
    assert "up to date" in run(["dvc", "status"], repo).stdout
    for folder in OUTPUT_FOLDERS:
        leftovers = [p for p in (repo / folder).rglob("*") if ".tmp-" in p.name]
        assert not leftovers, leftovers
    publish_reproduced_repo(repo, tmp_path_factory)


def tree_digest(folder: Path) -> str:
    """Return a digest of every file's relative path and content below `folder`."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 10 MiB tmpfs: room for one copy of the digits images, not two."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_keeps_previous_output(project: Path, small_disk: Path) -> None:
    from stages.download import download

    raw = small_disk / "raw"
    download([], output=raw)
    before = tree_digest(raw)

    with pytest.raises(DiskFullError) as raised:
        download([], output=raw)
    message = str(raised.value)
    assert str(raw) in message
    assert "Disk full: no space left on the device" in message
    assert raised.value.errno == 28
    assert tree_digest(raw) == before
    assert not [p for p in small_disk.iterdir() if ".tmp-" in p.name]

    report = small_disk / "report.txt"
    write_text(report, "previous")
    with pytest.raises(DiskFullError, match="report.txt"):
        write_text(report, "x" * 8 * 2**20)
    assert report.read_text() == "previous"
    assert [p.name for p in small_disk.iterdir() if ".tmp-" in p.name] == []
    assert os.path.ismount(small_disk)
