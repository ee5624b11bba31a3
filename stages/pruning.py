"""Early stopping of unpromising sweep trials by Optuna's pruner.

The sweeper starts each trial with SWEEP_OPTUNA_TRIAL set to
"<journal file>|<study name>|<trial id>|<metric>". The training process then
reports the metric after every epoch to that trial in the shared journal
and stops training when the pruner decides to prune the trial.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

OPTUNA_TRIAL_ENV = "SWEEP_OPTUNA_TRIAL"


def parse_pointer(pointer: str) -> tuple[str, str, int, str]:
    """Split SWEEP_OPTUNA_TRIAL into journal path, study, trial id and metric."""
    parts = pointer.split("|")
    if len(parts) != 4 or not parts[2].isdigit():
        raise ValueError(
            f"{OPTUNA_TRIAL_ENV}={pointer!r} is invalid; expected "
            "'<journal file>|<study name>|<trial id>|<metric>'"
        )
    return parts[0], parts[1], int(parts[2]), parts[3]


def make_pruner(spec: dict):
    """Rebuild the sweep's pruner from the description stored in the study."""
    import optuna

    kind = spec.get("type", "median")
    warmup = int(spec.get("n_warmup_steps") or 0)
    if kind == "threshold":
        return optuna.pruners.ThresholdPruner(
            lower=spec.get("lower"), upper=spec.get("upper"), n_warmup_steps=warmup
        )
    if kind == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_warmup_steps=warmup)


def pruning_callback():
    """Return a Keras callback reporting to the sweep's Optuna trial, or None
    when the process is not a sweep trial."""
    pointer = os.environ.get(OPTUNA_TRIAL_ENV)
    if not pointer:
        return None
    import keras
    import mlflow
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path, study_name, trial_id, metric = parse_pointer(pointer)
    storage = JournalStorage(JournalFileBackend(path))
    study = optuna.load_study(study_name=study_name, storage=storage)
    study.pruner = make_pruner(study.user_attrs.get("pruner") or {})
    trial = optuna.trial.Trial(study, trial_id)

    class OptunaPruning(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            value = (logs or {}).get(metric)
            if value is None:
                return
            trial.report(float(value), step=epoch + 1)
            if trial.should_prune():
                log.warning(
                    "Pruned by the sweep after epoch %d (%s=%.4f)",
                    epoch + 1,
                    metric,
                    value,
                )
                mlflow.set_tags({"pruned": "true", "pruned_at_epoch": str(epoch + 1)})
                self.model.stop_training = True

    log.info(
        "Reporting %s to Optuna trial %d of study '%s'", metric, trial_id, study_name
    )
    return OptunaPruning()
