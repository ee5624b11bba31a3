"""The whole pipeline through real DVC: repro, no-op repro, and experiments."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, client_for

pytestmark = pytest.mark.slow


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a command with the venv first on PATH; fail the test with its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, (
        f"{command} failed:\n{result.stdout}\n{result.stderr}"
    )
    return result


def stages_run(result: subprocess.CompletedProcess) -> list[str]:
    """Names of the stages that DVC ran (not skipped or restored)."""
    lines = (result.stdout + result.stderr).splitlines()
    return [line.split("'")[1] for line in lines if line.startswith("Running stage")]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git clone-like copy of the project's tracked files."""
    folder = tmp_path_factory.mktemp("pipeline") / "repo"
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, folder / name)
    run(["git", "init", "-q"], folder)
    run(["git", "add", "-A"], folder)
    run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base"],
        folder,
    )
    return folder


def test_pipeline_repro_then_experiments(repo: Path) -> None:
    run(
        [sys.executable, "-m", "stages.config", "model=cnn_small", "train.epochs=1"],
        repo,
    )
    first = run(["dvc", "repro"], repo)
    assert stages_run(first) == ["download", "preprocess", "split", "train", "evaluate"]
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert 0.3 < evaluation["accuracy"] <= 1.0
    assert (repo / "models/model.keras").is_file()
    assert (repo / "plots/confusion_matrix.png").is_file()

    client = client_for(repo)
    run_id = json.loads((repo / "metrics/train.json").read_text())["mlflow_run_id"]
    stored = client.get_run(run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params["train.epochs"] == "1"
    assert stored.data.tags["git_commit"]
    assert stored.data.metrics["test_accuracy"] == pytest.approx(evaluation["accuracy"])
    assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [1]
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert "evaluation/confusion_matrix.png" in artifacts

    again = run(["dvc", "repro"], repo)
    assert stages_run(again) == []
    assert "Data and pipelines are up to date" in again.stdout + again.stderr

    run(["git", "add", "-A"], repo)
    run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run"],
        repo,
    )
    experiment = run(
        ["dvc", "exp", "run", "-S", "model=cnn_small", "-S", "train.epochs=2"], repo
    )
    assert stages_run(experiment) == ["train", "evaluate"]
    runs = client.search_runs([stored.info.experiment_id], order_by=["start_time DESC"])
    assert len(runs) == 2
    assert runs[0].data.params["train.epochs"] == "2"
    assert runs[0].data.tags["dvc_exp_name"]

    temp = run(
        [
            "dvc",
            "exp",
            "run",
            "--temp",
            "-S",
            "model=cnn_small",
            "-S",
            "train.epochs=1",
            "-S",
            "train.learning_rate=0.002",
        ],
        repo,
    )
    assert stages_run(temp) == ["train", "evaluate"]
    runs = client.search_runs([stored.info.experiment_id])
    assert len(runs) == 3
    assert {r.data.params["train.learning_rate"] for r in runs} >= {"0.002"}
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))
    assert not list((repo / ".dvc" / "tmp").rglob("mlruns"))
