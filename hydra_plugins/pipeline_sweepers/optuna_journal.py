"""A Hydra sweeper driven by a current Optuna, with the study stored on disk.

Select it with `hydra/sweeper=optuna_journal` (the files in conf/sweep/ do).
The study lives in an Optuna journal file, so rerunning the same command
resumes it: finished trials count toward `n_trials`, and trials left running
by an interrupted sweep are marked failed. Trials are asked for in batches of
`n_jobs` and handed to the configured Hydra launcher, so joblib or submitit
run them in parallel. Each trial reports its per-epoch metric to the study
from the training process, which lets the pruner stop unpromising trials.

The search space uses Hydra's sweep grammar: `choice(a, b)`, `range(1, 5)`,
`interval(0.0, 0.5)`, `tag(log, interval(1e-4, 1e-1))` and
`tag(int, interval(1, 8))`.
"""

# No `from __future__ import annotations` here: Hydra imports plugin modules
# without registering them in sys.modules, and dataclasses then cannot resolve
# string annotations.
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from stages.pruning import OPTUNA_TRIAL_ENV

log = logging.getLogger(__name__)


@dataclass
class OptunaJournalSweeperConf:
    """Settings of the sweeper, under `hydra.sweeper`."""

    _target_: str = (
        "hydra_plugins.pipeline_sweepers.optuna_journal.OptunaJournalSweeper"
    )
    study_name: str = "sweep"
    storage: str = "sweeps/${hydra.sweeper.study_name}.journal"
    sampler: str = "tpe"  # tpe | random
    seed: int | None = None
    n_trials: int = 10
    n_jobs: int = 1
    pruner: str = "median"  # median | threshold | none
    pruner_warmup_epochs: int = 1
    pruner_lower: float | None = None  # threshold pruner: prune below this value
    pruner_upper: float | None = None  # threshold pruner: prune above this value
    params: dict[str, str] = field(default_factory=dict)
    enqueue: list[dict[str, Any]] = field(default_factory=list)


ConfigStore.instance().store(
    group="hydra/sweeper",
    name="optuna_journal",
    node=OptunaJournalSweeperConf,
    provider="pipeline_sweepers",
)


def _value_text(value: Any) -> str:
    """Write a value as it appears on the right of an override."""
    return value if isinstance(value, str) else json.dumps(value)


def search_space(params: dict[str, str]) -> dict[str, Any]:
    """Translate Hydra sweep expressions into Optuna distributions."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    parser = OverridesParser.create()
    space = {}
    for key, expression in params.items():
        override = parser.parse_override(f"{key}={expression}")
        sweep = override.value()
        if isinstance(sweep, ChoiceSweep):
            choices = [_value_text(v) for v in sweep.list]
            space[key] = CategoricalDistribution(choices)
        elif isinstance(sweep, RangeSweep):
            values = list(override.sweep_iterator())
            space[key] = CategoricalDistribution([_value_text(v) for v in values])
        elif isinstance(sweep, IntervalSweep):
            log_scale = "log" in sweep.tags
            if "int" in sweep.tags:
                space[key] = IntDistribution(
                    int(sweep.start), int(sweep.end), log=log_scale
                )
            else:
                space[key] = FloatDistribution(sweep.start, sweep.end, log=log_scale)
        else:
            raise ValueError(
                f"hydra.sweeper.params.{key}: '{expression}' is not a search range; "
                "use choice(...), range(...) or interval(...)"
            )
    return space


def make_sampler(name: str, seed: int | None):
    import optuna

    samplers = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
    }
    if name not in samplers:
        raise ValueError(
            f"hydra.sweeper.sampler: '{name}' is not supported; use tpe or random"
        )
    return samplers[name](seed=seed)


def make_pruner(conf: DictConfig):
    import optuna

    if conf.pruner == "median":
        return optuna.pruners.MedianPruner(n_warmup_steps=conf.pruner_warmup_epochs)
    if conf.pruner == "threshold":
        return optuna.pruners.ThresholdPruner(
            lower=conf.pruner_lower,
            upper=conf.pruner_upper,
            n_warmup_steps=conf.pruner_warmup_epochs,
        )
    if conf.pruner == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(
        f"hydra.sweeper.pruner: '{conf.pruner}' is not supported; "
        "use median, threshold or none"
    )


class OptunaJournalSweeper(Sweeper):
    """Ask Optuna for trials, launch them with Hydra, and tell Optuna the results."""

    def __init__(self, **settings: Any) -> None:
        self.settings = OmegaConf.create(settings)
        self.study = None
        self.metric = "val_accuracy"

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _open_study(self, storage_path: Path):
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        storage_path.parent.mkdir(parents=True, exist_ok=True)
        storage = JournalStorage(JournalFileBackend(str(storage_path)))
        direction = self.config.sweep.direction
        study = optuna.create_study(
            study_name=self.settings.study_name,
            storage=storage,
            direction=direction,
            sampler=make_sampler(self.settings.sampler, self.settings.seed),
            pruner=make_pruner(self.settings),
            load_if_exists=True,
        )
        # A seeded sampler would repeat its first suggestions on every resume.
        if self.settings.seed is not None:
            seed = self.settings.seed + len(study.trials)
            study.sampler = make_sampler(self.settings.sampler, seed)
        # Trials run in other processes, which load the study without the
        # pruner; they rebuild it from this attribute (stages/pruning.py).
        study.set_user_attr(
            "pruner",
            {
                "type": self.settings.pruner,
                "n_warmup_steps": self.settings.pruner_warmup_epochs,
                "lower": self.settings.pruner_lower,
                "upper": self.settings.pruner_upper,
            },
        )
        stale = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
        for trial in stale:
            log.warning("Trial %d was left running; marking it failed", trial.number)
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        return study

    def _enqueue_once(self, study, space: dict[str, Any]) -> None:
        """Queue the configured trials, once per study (not again on resume)."""
        from optuna.distributions import CategoricalDistribution

        if not self.settings.enqueue or study.user_attrs.get("enqueued"):
            return
        for params in OmegaConf.to_container(self.settings.enqueue):
            study.enqueue_trial(
                {
                    key: _value_text(value)
                    if isinstance(space.get(key), CategoricalDistribution)
                    else value
                    for key, value in params.items()
                }
            )
        study.set_user_attr("enqueued", True)

    def _overrides(self, trial, storage_path: Path, arguments: list[str]) -> list[str]:
        # NOTE: Trial._trial_id is private in Optuna 5, but a process that
        # reports to this trial needs the storage's id, not the trial number.
        fields = (storage_path, self.settings.study_name, trial._trial_id, self.metric)
        pointer = "|".join(str(f) for f in fields)
        return [
            *(f"{key}={_value_text(value)}" for key, value in trial.params.items()),
            *arguments,
            f"+hydra.job.env_set.{OPTUNA_TRIAL_ENV}='{pointer}'",
        ]

    def sweep(self, arguments: list[str]) -> list[Any]:
        """Run trials until the study contains `n_trials` finished ones."""

        storage_path = Path(self.settings.storage).resolve()
        self.metric = self.config.sweep.metric
        study = self._open_study(storage_path)
        self.study = study
        space = search_space(OmegaConf.to_container(self.settings.params))
        self._enqueue_once(study, space)
        done = len([t for t in study.trials if t.state.is_finished()])
        log.info(
            "Study '%s' in %s: %d of %d trials done",
            study.study_name,
            storage_path,
            done,
            self.settings.n_trials,
        )
        returns = []
        while done < self.settings.n_trials:
            size = min(self.settings.n_jobs, self.settings.n_trials - done)
            trials = [study.ask(space) for _ in range(size)]
            batch = [self._overrides(t, storage_path, list(arguments)) for t in trials]
            results = self.launcher.launch(batch, initial_job_idx=done)
            for trial, result in zip(trials, results, strict=True):
                self._tell(study, trial, result)
            returns.append(results)
            done += size
        return returns

    def _tell(self, study, trial, result) -> None:
        import optuna

        outcome = result.return_value if result.status == JobStatus.COMPLETED else None
        status = (outcome or {}).get("status", "FAILED")
        value = (outcome or {}).get("value")
        if status == "PRUNED":
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif status == "FINISHED" and value is not None:
            study.tell(trial, value)
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        log.info(
            "Trial %d: %s %s", trial.number, status, "" if value is None else value
        )
