"""Hyperparameter sweeps on Hydra's multirun: each trial is a DVC experiment.

    python -m stages.sweep --multirun train.learning_rate=0.001,0.01 model=cnn_small,cnn
    python -m stages.sweep --multirun +sweep=lr_search          # Optuna, conf/sweep/
    python -m stages.sweep --multirun +sweep=lr_search hydra/launcher=joblib

Reads conf/multirun.yaml (conf/config.yaml plus the `sweep` settings: metric,
direction, GPUs). Each trial runs `dvc exp run --temp` with its overrides and
returns its val metric. The sweep's parent MLflow run gets the search space,
a table of trials, the best trial and two pictures.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from stages import sweeping
from stages.config import TrackingConfig, find_root

log = logging.getLogger("stages.sweep")


def _tracking(cfg: DictConfig) -> tuple[str, str]:
    from stages.tracking import tracking_uri

    tracking = TrackingConfig(**OmegaConf.to_container(cfg.tracking, resolve=True))
    return tracking_uri(tracking), tracking.experiment_name


def _reused_run(root: Path, name: str, uri: str, parent: str | None, key: str):
    """Find the earlier run of a trial that DVC restored from its run cache."""
    from mlflow.tracking import MlflowClient

    metrics = sweeping.experiment_metrics(root, name)
    if not metrics or not metrics.get("mlflow_run_id"):
        return None
    client = MlflowClient(uri)
    source = client.get_run(metrics["mlflow_run_id"])
    log.info("Trial %s reused run %s from DVC's run cache", name, source.info.run_id)
    child = sweeping.record_reused_trial(uri, parent, key, source)
    return client.get_run(child)


def run_trial(cfg: DictConfig) -> dict[str, Any]:
    """Run one trial as a DVC experiment and return its outcome as a dict.

    A failed trial is returned with status FAILED (and a FAILED MLflow run)
    instead of raising, so the sweep goes on with the next trial.
    """
    hydra_cfg = HydraConfig.get()
    overrides = sweeping.stage_overrides(list(hydra_cfg.overrides.task))
    root = find_root()
    key = sweeping.new_trial_key()
    gpus = (
        [str(g) for g in cfg.sweep.gpus]
        if cfg.sweep.gpus is not None
        else sweeping.detect_gpus()
    )
    gpu = sweeping.assign_gpu(hydra_cfg.job.num, gpus)
    parent = os.environ.get(sweeping.PARENT_ENV)
    env = sweeping.trial_env(
        parent, key, gpu, os.environ.get(sweeping.OPTUNA_TRIAL_ENV)
    )
    name = f"{cfg.sweep.name}-{hydra_cfg.job.num}-{key[:6]}"
    completed = sweeping.run_trial_experiment(overrides, env, root, name)

    uri, experiment = _tracking(cfg)
    run = sweeping.find_trial_run(uri, experiment, key)
    if completed.returncode != 0:
        error = (completed.stderr or completed.stdout)[-3000:]
        log.error("Trial %s failed:\n%s", name, error)
        run_id = (
            run.info.run_id
            if run
            else sweeping.record_failed_trial(
                uri, experiment, parent, key, overrides, error
            )
        )
        result = sweeping.TrialResult("FAILED", None, run_id, name, error=error[-500:])
        return asdict(result)
    if run is None:
        run = _reused_run(root, name, uri, parent, key)
    if run is None:
        error = f"no MLflow run tagged {sweeping.TRIAL_TAG}={key} in '{experiment}'"
        log.error("Trial %s: %s", name, error)
        return asdict(sweeping.TrialResult("FAILED", None, None, name, error=error))
    pruned = run.data.tags.get(sweeping.PRUNED_TAG) == "true"
    value = sweeping.metric_value(run, cfg.sweep.metric)
    status = "PRUNED" if pruned else "FINISHED"
    log.info(
        "Trial %s: %s %s=%s (run %s)",
        name,
        status,
        cfg.sweep.metric,
        value,
        run.info.run_id,
    )
    return asdict(sweeping.TrialResult(status, value, run.info.run_id, name))


# An absolute path, so the `image-sweep` console script finds conf/ as well.
CONF_PATH = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="multirun")
def main(cfg: DictConfig) -> dict[str, Any]:
    """Entry point of each Hydra job."""
    return run_trial(cfg)


if __name__ == "__main__":
    main()
