"""The parent MLflow run of a sweep: opened before the first trial, closed
with a table of trials, the best trial and pictures after the last one.

`SweepTracker` is a Hydra callback (conf/multirun.yaml registers it), so it
works with any sweeper and launcher.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from stages import sweeping
from stages.config import TrackingConfig

log = logging.getLogger(__name__)

STUDY_TAG = "sweep_study"


def _client(config: DictConfig):
    from mlflow.tracking import MlflowClient

    from stages.tracking import tracking_uri, use_experiment

    tracking = TrackingConfig(**OmegaConf.to_container(config.tracking, resolve=True))
    experiment_id = use_experiment(tracking)
    return MlflowClient(tracking_uri(tracking)), experiment_id


def search_space_params(config: DictConfig) -> dict[str, str]:
    """Describe what the sweep varies: sweeper params and sweep overrides."""
    space = {}
    params = OmegaConf.select(config, "hydra.sweeper.params")
    if params is not None:
        for key, value in OmegaConf.to_container(params).items():
            space[f"space.{key}"] = str(value)
    for override in OmegaConf.select(config, "hydra.overrides.task") or []:
        key, _, value = str(override).lstrip("+").partition("=")
        if "," in value or "(" in value:
            space[f"space.{key}"] = value
    return space


def _study_key(config: DictConfig) -> str | None:
    storage = OmegaConf.select(config, "hydra.sweeper.storage")
    study = OmegaConf.select(config, "hydra.sweeper.study_name")
    if not storage or not study:
        return None
    return f"{Path(storage).resolve()}|{study}"


def open_parent_run(config: DictConfig) -> str:
    """Create the sweep's parent run, or reopen the one of a resumed study."""
    client, experiment_id = _client(config)
    study_key = _study_key(config)
    if study_key:
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.{STUDY_TAG} = '{study_key}'"
        )
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            log.info("Resuming sweep parent run %s", run_id)
            return run_id
    tags = {"sweep": "true", STUDY_TAG: study_key or ""}
    name = f"{config.sweep.name}-{secrets.token_hex(3)}"
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    for key, value in search_space_params(config).items():
        client.log_param(run.info.run_id, key, value[:6000])
    client.log_param(run.info.run_id, "sweep.metric", config.sweep.metric)
    client.log_param(run.info.run_id, "sweep.direction", config.sweep.direction)
    log.info("Sweep parent run %s", run.info.run_id)
    return run.info.run_id


def trials_table(
    client, experiment_id: str, parent_id: str, metric: str
) -> pd.DataFrame:
    """Tabulate the child runs: run id, status, metric and the params that vary."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=10_000,
    )
    rows = []
    for run in runs:
        pruned = run.data.tags.get(sweeping.PRUNED_TAG) == "true"
        status = "PRUNED" if pruned else run.info.status
        rows.append(
            {
                "run_id": run.info.run_id,
                "status": status,
                metric: run.data.metrics.get(metric),
                **run.data.params,
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    fixed = [c for c in table.columns[3:] if table[c].nunique(dropna=False) <= 1]
    return table.drop(columns=fixed)


def best_trial(table: pd.DataFrame, metric: str, direction: str) -> pd.Series | None:
    """Return the finished row with the best metric, or None."""
    finished = table[(table["status"] == "FINISHED") & table[metric].notna()]
    if finished.empty:
        return None
    index = (
        finished[metric].idxmax()
        if direction == "maximize"
        else finished[metric].idxmin()
    )
    return finished.loc[index]


def _distribution(values: pd.Series):
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.notna().all() and numbers.min() < numbers.max():
        low, high = float(numbers.min()), float(numbers.max())
        return FloatDistribution(low, high, log=low > 0 and high / low >= 10), True
    return CategoricalDistribution(sorted(set(values.astype(str)))), False


def study_from_table(table: pd.DataFrame, metric: str, direction: str):
    """Rebuild an in-memory Optuna study from the trials, to draw its pictures."""
    import optuna

    study = optuna.create_study(direction=direction)
    columns = [c for c in table.columns if c not in ("run_id", "status", metric)]
    distributions = {
        c: _distribution(table[c].dropna()) for c in columns if table[c].notna().all()
    }
    states = {"FINISHED": "COMPLETE", "PRUNED": "PRUNED"}
    for _, row in table.iterrows():
        state = optuna.trial.TrialState[states.get(row["status"], "FAIL")]
        value = row[metric]
        if state.name == "COMPLETE" and (value is None or not math.isfinite(value)):
            state = optuna.trial.TrialState.FAIL
        params = {
            c: float(row[c]) if numeric else str(row[c])
            for c, (_, numeric) in distributions.items()
        }
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={c: d for c, (d, _) in distributions.items()},
                value=float(value) if state.name == "COMPLETE" else None,
                state=state,
            )
        )
    return study


def save_pictures(study, folder: Path) -> list[Path]:
    """Save the optimisation history and parameter importances as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    saved = []
    for name, draw in (
        ("optimization_history.png", optuna_plots.plot_optimization_history),
        ("param_importances.png", optuna_plots.plot_param_importances),
    ):
        try:
            axes = draw(study)
        except (ValueError, RuntimeError) as error:
            log.warning("No %s: %s", name, error)
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(9, 5)
        figure.tight_layout()
        figure.savefig(folder / name, dpi=100)
        plt.close(figure)
        saved.append(folder / name)
    return saved


def close_parent_run(config: DictConfig, parent_id: str) -> pd.DataFrame:
    """Summarise the trials in the parent run, print the table and end the run."""
    import tempfile

    client, experiment_id = _client(config)
    metric, direction = config.sweep.metric, config.sweep.direction
    table = trials_table(client, experiment_id, parent_id, metric)
    print(table.to_string(index=False) if not table.empty else "No trials ran.")
    best = best_trial(table, metric, direction) if not table.empty else None
    with tempfile.TemporaryDirectory() as folder:
        table.to_csv(Path(folder, "trials.csv"), index=False)
        files = [Path(folder, "trials.csv")]
        if not table.empty:
            files += save_pictures(
                study_from_table(table, metric, direction), Path(folder)
            )
        for path in files:
            client.log_artifact(parent_id, str(path))
    if best is not None:
        print(f"Best trial: run {best['run_id']} with {metric}={best[metric]}")
        client.log_metric(parent_id, f"best_{metric}", float(best[metric]))
        client.set_tag(parent_id, "best_run_id", best["run_id"])
        for key, value in best.drop(["run_id", "status", metric]).items():
            _log_best_param(client, parent_id, f"best.{key}", str(value))
    client.set_terminated(parent_id, "FINISHED")
    return table


def _log_best_param(client, run_id: str, key: str, value: str) -> None:
    """Log a param, or a tag when a resumed sweep found a different best trial
    (MLflow params cannot change once logged)."""
    from mlflow.exceptions import MlflowException

    try:
        client.log_param(run_id, key, value)
    except MlflowException:
        client.set_tag(run_id, key, value)


class SweepTracker(Callback):
    """Open the parent run before the sweep and summarise it afterwards."""

    def __init__(self) -> None:
        self.parent_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.parent_id = open_parent_run(config)
        os.environ[sweeping.PARENT_ENV] = self.parent_id

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_id:
            close_parent_run(config, self.parent_id)
