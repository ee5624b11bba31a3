"""Sweep trials as DVC experiments tracked as MLflow child runs.

Every trial of `python -m stages.sweep --multirun ...` runs
`dvc exp run --temp` with the trial's overrides, so it reuses the DVC-cached
download, preprocess and split outputs, appears in `dvc exp show`, and runs
train and evaluate exactly as `dvc repro` would. The stages read the sweep's
parent MLflow run and the trial key from environment variables and tag their
run with them, so the sweep can read each trial's metric from MLflow.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.pruning import OPTUNA_TRIAL_ENV

log = logging.getLogger(__name__)

PARENT_ENV = "SWEEP_PARENT_RUN_ID"
TRIAL_KEY_ENV = "SWEEP_TRIAL_ID"
# Not named "...key": secret masking hides the values of tags named like keys.
TRIAL_TAG = "sweep_trial_id"
PRUNED_TAG = "pruned"
# Overrides that steer the sweep itself and are not passed on to the stages.
SWEEP_ONLY_PREFIXES = ("sweep.", "+sweep", "sweep=", "hydra.", "hydra/")


@dataclass
class TrialResult:
    """Outcome of one trial: its status, metric and MLflow run."""

    status: str  # FINISHED, FAILED or PRUNED
    value: float | None = None
    run_id: str | None = None
    experiment_name: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    error: str | None = None


def stage_overrides(task_overrides: list[str]) -> list[str]:
    """Keep the overrides that change params.yaml, dropping the sweep's own."""
    return [
        o for o in task_overrides if not o.lstrip("+~").startswith(SWEEP_ONLY_PREFIXES)
    ]


def assign_gpu(job_index: int, gpus: list[str]) -> str | None:
    """Pick the GPU of a job, so parallel jobs spread over the visible GPUs.

    Returns:
        The value for CUDA_VISIBLE_DEVICES, or None to leave it unset (no GPUs).
    """
    if not gpus:
        return None
    return str(gpus[job_index % len(gpus)])


def detect_gpus() -> list[str]:
    """List GPU indices from CUDA_VISIBLE_DEVICES, else from `nvidia-smi -L`."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [
        str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU")
    ]


def trial_env(
    parent_run_id: str | None, trial_key: str, gpu: str | None, optuna_trial: str | None
) -> dict[str, str]:
    """Build the environment of a trial's `dvc exp run` process."""
    env = dict(os.environ)
    env[TRIAL_KEY_ENV] = trial_key
    if parent_run_id:
        env[PARENT_ENV] = parent_run_id
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    if optuna_trial:
        env[OPTUNA_TRIAL_ENV] = optuna_trial
    # Stage commands call `python`: make it this interpreter's environment.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_trial_experiment(
    overrides: list[str], env: dict[str, str], root: Path, name: str
) -> subprocess.CompletedProcess:
    """Run the pipeline once as a DVC experiment in a temporary copy."""
    command = ["dvc", "exp", "run", "--temp", "--name", name]
    for override in overrides:
        command += ["-S", override]
    log.info("Trial %s: %s", name, " ".join(command))
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)


def find_trial_run(tracking_uri: str, experiment_name: str, trial_key: str):
    """Return the training run tagged with `trial_key`, or None."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.{TRIAL_TAG} = '{trial_key}'"
    )
    return runs[0] if runs else None


def record_failed_trial(
    tracking_uri: str,
    experiment_name: str,
    parent_run_id: str | None,
    trial_key: str,
    overrides: list[str],
    error: str,
) -> str:
    """Create a FAILED child run for a trial that failed before logging a run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(experiment_name)
    )
    tags = {TRIAL_TAG: trial_key, "error": error[-5000:]}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, tags=tags, run_name=f"failed-{trial_key}")
    for override in overrides:
        key, _, value = override.lstrip("+").partition("=")
        client.log_param(run.info.run_id, key, value[:6000])
    client.set_terminated(run.info.run_id, "FAILED")
    return run.info.run_id


def experiment_metrics(root: Path, name: str, path: str = "metrics/train.json"):
    """Return the contents of a metrics file of DVC experiment `name`, or None."""
    import json

    shown = subprocess.run(
        ["dvc", "exp", "show", "--json"], cwd=root, capture_output=True, text=True
    )
    if shown.returncode != 0:
        return None
    for baseline in json.loads(shown.stdout or "[]"):
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs", []):
                if rev.get("name") == name:
                    metrics = (rev.get("data") or {}).get("metrics", {})
                    return (metrics.get(path) or {}).get("data")
    return None


def record_reused_trial(
    tracking_uri: str,
    parent_run_id: str | None,
    trial_key: str,
    source_run,
) -> str:
    """Create a child run for a trial that DVC restored from its run cache.

    DVC ran no stage for such a trial, so its training run is an earlier one.
    The child run copies that run's params and metrics and points to it.
    """
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    tags = {TRIAL_TAG: trial_key, "reused_run_id": source_run.info.run_id}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(
        source_run.info.experiment_id, tags=tags, run_name=f"reused-{trial_key}"
    )
    params = [Param(k, v) for k, v in source_run.data.params.items()]
    now = source_run.info.end_time or 0
    metrics = [Metric(k, v, now, 0) for k, v in source_run.data.metrics.items()]
    client.log_batch(run.info.run_id, metrics=metrics, params=params)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def new_trial_key() -> str:
    """Return a short unique key that names one trial."""
    return uuid.uuid4().hex[:12]


def metric_value(run: Any, metric: str) -> float | None:
    """Return the last logged value of `metric` in `run`, or None."""
    value = run.data.metrics.get(metric)
    return None if value is None else float(value)
