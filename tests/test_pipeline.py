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


def stages_run(result: subprocess.CompletedProcess | str) -> list[str]:
    """Names of the stages that DVC ran (not skipped or restored)."""
    text = result if isinstance(result, str) else result.stdout + result.stderr
    lines = text.splitlines()
    return [line.split("'")[1] for line in lines if line.startswith("Running stage")]


def copy_tracked_files(folder: Path) -> Path:
    """Copy the project's git-tracked (and new, unignored) files into a new git repo."""
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
    commit_all(folder, "base")
    return folder


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git clone-like copy of the project's tracked files."""
    return copy_tracked_files(tmp_path_factory.mktemp("pipeline") / "repo")


def commit_all(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], repo)
    run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message],
        repo,
    )


def experiment_runs(repo: Path) -> list:
    """All MLflow runs of the default experiment, newest first."""
    client = client_for(repo)
    experiment = client.get_experiment_by_name("image-classification")
    return client.search_runs([experiment.experiment_id], order_by=["start_time DESC"])


def train_run_id(repo: Path) -> str:
    return json.loads((repo / "metrics/train.json").read_text())["mlflow_run_id"]


@pytest.fixture(scope="module")
def first_repro(repo: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "stages.config",
        "model=cnn_small",
        "train.epochs=1",
    ]
    run(command, repo)
    return run(["dvc", "repro"], repo)


def test_pipeline_repro_runs_every_stage(repo: Path, first_repro) -> None:
    assert stages_run(first_repro) == [
        "download",
        "preprocess",
        "split",
        "train",
        "evaluate",
    ]
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert 0.3 < evaluation["accuracy"] <= 1.0
    assert (repo / "models/model.keras").is_file()
    assert (repo / "plots/confusion_matrix.png").is_file()

    client = client_for(repo)
    run_id = train_run_id(repo)
    stored = client.get_run(run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params["train.epochs"] == "1"
    assert stored.data.tags["git_commit"]
    assert stored.data.metrics["test_accuracy"] == pytest.approx(evaluation["accuracy"])
    assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [1]
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert "evaluation/confusion_matrix.png" in artifacts


def test_pipeline_second_repro_is_noop(repo: Path, first_repro) -> None:
    again = run(["dvc", "repro"], repo)
    assert stages_run(again) == []
    assert "Data and pipelines are up to date" in again.stdout + again.stderr


def test_pipeline_plots_render(repo: Path, first_repro, tmp_path: Path) -> None:
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], repo)
    page = (tmp_path / "plots" / "index.html").read_text()
    for title in ("Confusion matrix (test)", "Training curves", "roc_pr_curves.png"):
        assert title in page, title


def test_pipeline_exp_run_reruns_train_only(repo: Path, first_repro) -> None:
    commit_all(repo, "first run")
    experiment = run(
        ["dvc", "exp", "run", "-S", "model=cnn_small", "-S", "train.epochs=2"], repo
    )
    assert stages_run(experiment) == ["train", "evaluate"]
    runs = experiment_runs(repo)
    assert len(runs) == 2
    assert runs[0].data.params["train.epochs"] == "2"
    assert runs[0].data.tags["dvc_exp_name"]
    assert runs[0].info.run_id == train_run_id(repo)
    diff = json.loads(run(["dvc", "plots", "diff", "HEAD", "--json"], repo).stdout)
    curves = diff["data"]["Training curves"]
    assert curves[0]["revisions"] == ["workspace", "HEAD"]
    assert "Confusion matrix (test)" in diff["data"]
    # The confusion table is declared once, so it is not drawn under its file
    # name as well.
    assert "metrics/confusion.csv" not in diff["data"]


def test_pipeline_run_cache_keeps_run_id(repo: Path, first_repro) -> None:
    original = client_for(repo).search_runs(
        [experiment_runs(repo)[0].info.experiment_id],
        filter_string="params.`train.epochs` = '1'",
    )[0]
    restored = run(
        ["dvc", "exp", "run", "-S", "model=cnn_small", "-S", "train.epochs=1"], repo
    )
    assert "train" not in stages_run(restored)
    assert "Stage 'train' is cached" in restored.stdout + restored.stderr
    assert train_run_id(repo) == original.info.run_id
    assert len(experiment_runs(repo)) == 2


@pytest.mark.slow
def test_pipeline_temp_and_queued_runs_share_store(repo: Path, first_repro) -> None:
    # Other tests of this module may have added runs to the shared repo.
    before = len(experiment_runs(repo))
    overrides = ["-S", "model=cnn_small", "-S", "train.epochs=1"]
    temp = run(
        ["dvc", "exp", "run", "--temp", *overrides, "-S", "train.learning_rate=0.002"],
        repo,
    )
    assert stages_run(temp) == ["train", "evaluate"]
    run(
        [
            "dvc",
            "exp",
            "run",
            "--queue",
            *overrides,
            "-S",
            "train.learning_rate=0.003,0.004",
        ],
        repo,
    )
    run(["dvc", "exp", "run", "--run-all", "-j", "1"], repo)
    runs = experiment_runs(repo)
    rates = {r.data.params["train.learning_rate"] for r in runs}
    assert {"0.002", "0.003", "0.004"} <= rates
    assert len(runs) == before + 3
    assert all(r.info.status == "FINISHED" for r in runs)
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))
    assert not list((repo / ".dvc" / "tmp").rglob("mlruns"))
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    assert {r.info.run_id for r in runs[:3]} <= set(collect_run_ids(shown))


def collect_run_ids(node) -> list[str]:
    """Find every `mlflow_run_id` value in the output of `dvc exp show --json`."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "mlflow_run_id" and isinstance(value, str):
                found.append(value)
            else:
                found += collect_run_ids(value)
    elif isinstance(node, list):
        for item in node:
            found += collect_run_ids(item)
    return found
