"""Sweeps from the command line: DVC's queue with parallel workers, Hydra's
basic sweeper with the joblib and submitit launchers, and the Optuna sweeper
with a failing trial, a resumed study and a pruned trial."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import client_for
from tests.test_pipeline import collect_run_ids, commit_all, run, stages_run

pytestmark = pytest.mark.slow

TINY = ["model=cnn_small", "train.epochs=1"]


@pytest.fixture(scope="module")
def sweep_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git copy of the project after one `dvc repro` with tiny settings."""
    from tests.test_pipeline import copy_tracked_files

    folder = copy_tracked_files(tmp_path_factory.mktemp("sweep") / "repo")
    run([sys.executable, "-m", "stages.config", *TINY], folder)
    run(["dvc", "repro"], folder)
    commit_all(folder, "baseline")
    return folder


def experiment(repo: Path):
    client = client_for(repo)
    return client, client.get_experiment_by_name("image-classification").experiment_id


def runs_with_parent(repo: Path, parent_id: str) -> list:
    client, experiment_id = experiment(repo)
    return client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )


def latest_parent(repo: Path):
    client, experiment_id = experiment(repo)
    return client.search_runs(
        [experiment_id],
        filter_string="tags.sweep = 'true'",
        order_by=["attributes.start_time DESC"],
    )[0]


def sweep(repo: Path, *overrides: str) -> str:
    """Run the sweep command and return its output."""
    result = run([sys.executable, "-m", "stages.sweep", "--multirun", *overrides], repo)
    return result.stdout + result.stderr


def write_search(repo: Path, name: str, sweeper: dict) -> None:
    """Write conf/sweep/<name>.yaml selecting the Optuna sweeper."""
    content = {
        "defaults": [{"override /hydra/sweeper": "optuna_journal"}],
        "sweep": {"name": name.replace("_", "-")},
        "hydra": {"sweeper": {"study_name": name, **sweeper}},
    }
    text = "# @package _global_\n" + yaml.safe_dump(content, sort_keys=False)
    (repo / "conf" / "sweep" / f"{name}.yaml").write_text(text)


def load_study(repo: Path, name: str):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(
        JournalFileBackend(str(repo / "sweeps" / f"{name}.journal"))
    )
    return optuna.load_study(study_name=name, storage=storage)


def test_sweep_dvc_queue_grid_two_workers(sweep_repo: Path) -> None:
    client, experiment_id = experiment(sweep_repo)
    before = len(client.search_runs([experiment_id]))
    run(
        [
            "dvc",
            "exp",
            "run",
            "--queue",
            "-S",
            "train.epochs=1",
            "-S",
            "train.learning_rate=0.002,0.02",
            "-S",
            "model=cnn_small,cnn",
        ],
        sweep_repo,
    )
    run(["dvc", "queue", "start", "-j", "2"], sweep_repo)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], sweep_repo).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert status.count("Success") == 4, status

    names = [line.split()[1] for line in status.splitlines() if "Success" in line]
    for name in names:
        logs = run(["dvc", "queue", "logs", name], sweep_repo).stdout
        assert stages_run(logs) == [
            "train",
            "evaluate",
        ], name
        assert "database is locked" not in logs
    runs = client.search_runs([experiment_id])
    assert len(runs) == before + 4
    assert all(r.info.status == "FINISHED" for r in runs)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], sweep_repo).stdout)
    assert {r.info.run_id for r in runs[:4]} <= set(collect_run_ids(shown))


def test_sweep_basic_joblib_gpu_assignment(sweep_repo: Path) -> None:
    output = sweep(
        sweep_repo,
        *TINY,
        "train.learning_rate=0.003,0.03",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "sweep.gpus=[0,1]",
    )
    parent = latest_parent(sweep_repo)
    children = runs_with_parent(sweep_repo, parent.info.run_id)
    assert len(children) == 2
    devices = {
        r.data.params["train.learning_rate"]: r.data.tags["cuda_visible_devices"]
        for r in children
    }
    assert sorted(devices.values()) == ["0", "1"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["space.train.learning_rate"] == "0.003,0.03"
    assert parent.data.tags["best_run_id"] in {r.info.run_id for r in children}
    assert "Best trial: run" in output
    artifacts = {
        a.path for a in client_for(sweep_repo).list_artifacts(parent.info.run_id)
    }
    assert {"trials.csv", "optimization_history.png"} <= artifacts


def test_sweep_submitit_local_launcher(sweep_repo: Path) -> None:
    sweep(
        sweep_repo,
        *TINY,
        "train.learning_rate=0.004",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
    )
    parent = latest_parent(sweep_repo)
    (child,) = runs_with_parent(sweep_repo, parent.info.run_id)
    assert child.info.status == "FINISHED"
    assert child.data.params["train.learning_rate"] == "0.004"


def test_sweep_optuna_failed_trial_and_resume(sweep_repo: Path) -> None:
    write_search(
        sweep_repo,
        "search",
        {
            "sampler": "random",
            "seed": 0,
            "n_trials": 3,
            "pruner": "none",
            "params": {
                "train.learning_rate": "tag(log, interval(0.001, 0.03))",
                "model.dropout": "interval(0.0, 0.3)",
            },
            "enqueue": [{"model.dropout": 1.5}],
        },
    )
    sweep(sweep_repo, "+sweep=search", *TINY)
    study = load_study(sweep_repo, "search")
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "COMPLETE", "COMPLETE"]
    parent = latest_parent(sweep_repo)
    children = runs_with_parent(sweep_repo, parent.info.run_id)
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED", "FINISHED"]
    failed = next(r for r in children if r.info.status == "FAILED")
    assert "model.dropout" in failed.data.tags["error"]

    study.ask()  # a trial left running, as by an interrupted sweep
    sweep(sweep_repo, "+sweep=search", *TINY, "hydra.sweeper.n_trials=5")
    study = load_study(sweep_repo, "search")
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    resumed = latest_parent(sweep_repo)
    assert resumed.info.run_id == parent.info.run_id
    assert len(runs_with_parent(sweep_repo, parent.info.run_id)) == 4
    assert resumed.info.status == "FINISHED"


def test_sweep_optuna_prunes_trial(sweep_repo: Path) -> None:
    write_search(
        sweep_repo,
        "prune",
        {
            "sampler": "random",
            "seed": 1,
            "n_trials": 1,
            "pruner": "threshold",
            "pruner_lower": 0.999,
            "pruner_warmup_epochs": 0,
            "params": {"train.learning_rate": "interval(0.001, 0.002)"},
        },
    )
    sweep(sweep_repo, "+sweep=prune", "model=cnn_small", "train.epochs=3")
    (trial,) = load_study(sweep_repo, "prune").trials
    assert trial.state.name == "PRUNED"
    assert list(trial.intermediate_values) == [1]
    parent = latest_parent(sweep_repo)
    (child,) = runs_with_parent(sweep_repo, parent.info.run_id)
    assert child.data.tags["pruned"] == "true"
    history = client_for(sweep_repo).get_metric_history(
        child.info.run_id, "val_accuracy"
    )
    assert [m.step for m in history] == [1]
