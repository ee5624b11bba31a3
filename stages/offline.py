"""Logging that survives an unreachable MLflow tracking server.

With an http(s) tracking URI, the stages reach MLflow through FailoverStore
(a RestStore) and FailoverArtifactRepository (the `mlflow-artifacts` scheme
of served artifacts). While the server responds, both pass every call on.
When a call fails because the server cannot be reached, the run moves to a
local copy in the project's default store (mlflow.db and mlartifacts/).
The parameters, tags, metrics and inputs that this process logged so far are
copied there, and the failed call is repeated locally. Every later call for
the run goes there too, also from later stages, which keep using the
server's run id.

With tracking.offline_fallback, a server that is unreachable when a stage
starts puts the stage in offline mode, so its experiments and new runs live
in the local store from the start.

Local copies carry `offline.*` tags: the server and server run they belong
to, why they were made, and whether they are `pending` or `uploaded`.
`python -m stages.upload` replays pending copies to their server.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from stages.config import ConfigError
from stages.redaction import mask_uri, redact, strip_credentials

log = logging.getLogger(__name__)

TAG_STATE = "offline.state"
TAG_RUN = "offline.run_id"  # the run id that the stages use for the copy
TAG_SERVER = "offline.server"
TAG_SERVER_RUN = "offline.server_run_id"
TAG_SERVER_EXPERIMENT = "offline.server_experiment_id"
TAG_REASON = "offline.reason"
TAG_FALLBACK = "offline.fallback"
TAG_SERVER_MODEL = "offline.server_model_id"
TAG_REGISTER_MODEL = "offline.register_model"
PENDING, UPLOADED = "pending", "uploaded"

# Defaults for a remote store, so an unreachable server is noticed after
# about 5 s (2 retries, waits of 1 s and 2 s) instead of after mlflow 3.17's
# default of 7 retries, about 4 minutes. Values set in the environment win.
FAST_FAILURE_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
# SqlAlchemyStore.log_batch accepts at most this many of each per call.
MAX_BATCH = {"params": 100, "tags": 100, "metrics": 1000}
UPLOAD_HINT = "`make upload` (python -m stages.upload)"


class TrackingUnavailableError(ConfigError):
    """The tracking server cannot be reached; the message names it and the fix."""


def is_unavailable(error: BaseException) -> bool:
    """Tell whether `error` comes from a server that cannot be reached.

    MLflow wraps the network error of `requests` in an MlflowException, so
    the check walks the chain of causes.
    """
    import requests

    network_errors = (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.RetryError,
        ConnectionError,
        TimeoutError,
    )
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, network_errors):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def local_store_uri() -> str:
    """Return the URI of the project's default store (mlflow.db at the root)."""
    from stages.tracking import DB_NAME, project_root

    return f"sqlite:///{project_root() / DB_NAME}"


def local_artifact_root() -> str:
    """Return the artifact root of the project's default store."""
    from stages.tracking import ARTIFACTS_DIR, project_root

    return (project_root() / ARTIFACTS_DIR).as_uri()


_local_stores: dict[str, Any] = {}


def local_store():
    """Return the SqlAlchemyStore of the project's default store, opened once."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    uri = local_store_uri()
    if uri not in _local_stores:
        _local_stores[uri] = SqlAlchemyStore(uri, local_artifact_root())
    return _local_stores[uri]


def local_experiment_id(store, name: str) -> str:
    """Return the id of experiment `name` in `store`, creating it if needed."""
    from mlflow.exceptions import MlflowException

    experiment = store.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return store.create_experiment(name, artifact_location=local_artifact_root())
    except MlflowException:
        # Another process created it between the lookup and the create.
        return store.get_experiment_by_name(name).experiment_id


def log_batch_in_chunks(store, run_id: str, metrics=(), params=(), tags=()) -> None:
    """Log any number of metrics, params and tags within the store's batch limits."""
    metrics, params, tags = list(metrics), list(params), list(tags)
    while metrics or params or tags:
        store.log_batch(
            run_id,
            metrics=metrics[: MAX_BATCH["metrics"]],
            params=params[: MAX_BATCH["params"]],
            tags=tags[: MAX_BATCH["tags"]],
        )
        metrics = metrics[MAX_BATCH["metrics"] :]
        params = params[MAX_BATCH["params"] :]
        tags = tags[MAX_BATCH["tags"] :]


def drop_cached_artifact_repo(resource_id: str) -> None:
    """Forget MLflow's cached artifact repository of a run or logged model."""
    from mlflow.tracking._tracking_service import utils

    utils._artifact_repos_cache.pop(resource_id, None)


@dataclass
class LocalCopy:
    """A run kept in the local store instead of, or besides, the server.

    `caller_id` is the id the stages use: the server's run id for a run that
    moved mid-way, the local id for a run started in offline mode.
    """

    caller_id: str
    local_id: str
    server_run_id: str | None
    server_experiment_id: str | None
    state: str


@dataclass
class RunJournal:
    """Params, tags, metrics and inputs that this process logged to a server
    run, kept to rebuild the run locally."""

    info: Any = None
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: list = field(default_factory=list)
    datasets: list = field(default_factory=list)


class Failover:
    """Routing state for one tracking server: local copies, journals, mode."""

    def __init__(self, server_uri: str) -> None:
        self.server_uri = server_uri
        self.experiment_name = "Default"
        self.allow_fallback = False
        self.offline_reason: str | None = None
        self.copies: dict[str, LocalCopy] = {}
        self.models: dict[str, str] = {}  # caller model id -> local model id
        self.journal: dict[str, RunJournal] = {}
        self.model_journal: dict[str, Any] = {}
        self.experiment_names: dict[str, str] = {}
        self.lock = threading.RLock()
        self._loaded = False

    @property
    def offline(self) -> bool:
        """Whether the stage started without the server (offline mode)."""
        return self.offline_reason is not None

    def go_offline(self, reason: str) -> None:
        """Keep experiments and new runs in the local store from now on."""
        self.offline_reason = reason
        # MLflow would print the server's URL of each local run.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"

    # Local copies made by earlier processes are found through their tags.
    def load_copies(self) -> None:
        """Read the local copies of this server's runs from the local store."""
        from stages.tracking import DB_NAME, project_root

        if self._loaded or not (project_root() / DB_NAME).is_file():
            self._loaded = True
            return
        from mlflow.entities import ViewType

        store = local_store()
        experiments = store.search_experiments(view_type=ViewType.ALL)
        server = strip_credentials(self.server_uri)
        for run in store.search_runs(
            [e.experiment_id for e in experiments],
            f"tags.`{TAG_SERVER}` = '{server}'",
            ViewType.ALL,
            max_results=50_000,
        ):
            copy = copy_from_tags(run.info.run_id, run.data.tags)
            self.copies.setdefault(copy.caller_id, copy)
        self._loaded = True

    def copy_for(self, run_id: str) -> LocalCopy | None:
        """Return the local copy (pending or uploaded) of run `run_id`, if any."""
        with self.lock:
            self.load_copies()
            return self.copies.get(run_id)

    def local_experiment(self, server_experiment_id: str | None) -> str:
        """Return the local experiment that mirrors a server experiment."""
        name = self.experiment_names.get(server_experiment_id or "")
        return local_experiment_id(local_store(), name or self.experiment_name)

    def offline_tags(self, reason: str, fallback: bool) -> dict[str, str]:
        """Return the tags that mark a run as a pending local copy."""
        tags = {
            TAG_STATE: PENDING,
            TAG_SERVER: strip_credentials(self.server_uri),
            TAG_REASON: redact(reason)[:5000],
        }
        if fallback:
            tags[TAG_FALLBACK] = "true"
        return tags

    def register_local_run(self, run) -> LocalCopy:
        """Record a run created in the local store while offline."""
        copy = LocalCopy(run.info.run_id, run.info.run_id, None, None, PENDING)
        with self.lock:
            self.copies[copy.caller_id] = copy
        return copy

    def switch(
        self, run_id: str, error: BaseException, server_run_id: str | None = None
    ) -> LocalCopy:
        """Move run `run_id` to a local copy after the server became unreachable.

        `server_run_id` is the run's id on the server when it differs from
        `run_id`, as for an uploaded run that started in offline mode.
        """
        from mlflow.entities import Param, RunTag

        with self.lock:
            existing = self.copies.get(run_id)
            if existing is not None and existing.state == PENDING:
                return existing
            journal = self.journal.get(run_id, RunJournal())
            info = journal.info
            server_experiment = info.experiment_id if info else None
            store = local_store()
            server_run_id = server_run_id or run_id
            tags = {**journal.tags, **self.offline_tags(str(error), fallback=False)}
            tags[TAG_RUN] = run_id
            tags[TAG_SERVER_RUN] = server_run_id
            if server_experiment:
                tags[TAG_SERVER_EXPERIMENT] = server_experiment
            run = store.create_run(
                experiment_id=self.local_experiment(server_experiment),
                user_id=(info.user_id if info else None) or os.environ.get("USER", ""),
                start_time=(info.start_time if info else None) or now_ms(),
                tags=[RunTag(k, v) for k, v in tags.items()],
                run_name=info.run_name if info else None,
            )
            local_id = run.info.run_id
            log_batch_in_chunks(
                store,
                local_id,
                metrics=journal.metrics,
                params=[Param(k, v) for k, v in journal.params.items()],
            )
            if journal.datasets:
                store.log_inputs(local_id, datasets=journal.datasets)
            copy = LocalCopy(
                run_id, local_id, server_run_id, server_experiment, PENDING
            )
            self.copies[run_id] = copy
            drop_cached_artifact_repo(run_id)
        log.warning(
            "Lost the MLflow tracking server %s while logging run %s (%s). The run "
            "goes on in the local store %s as run %s and stays incomplete on the "
            "server until %s copies it there.",
            mask_uri(self.server_uri),
            run_id,
            redact(short_reason(error)),
            local_store_uri(),
            local_id,
            UPLOAD_HINT,
        )
        return copy

    def switch_model(self, model_id: str, error: BaseException) -> str:
        """Move logged model `model_id` (and its run) to the local store."""
        from mlflow.entities import LoggedModelTag

        with self.lock:
            if model_id in self.models:
                return self.models[model_id]
            model = self.model_journal.get(model_id)
            if model is None:
                raise unavailable_error(self.server_uri, error) from error
            copy = None
            if model.source_run_id:
                copy = self.switch(model.source_run_id, error)
            experiment = (
                local_store().get_run(copy.local_id).info.experiment_id
                if copy
                else self.local_experiment(model.experiment_id)
            )
            tags = [LoggedModelTag(k, v) for k, v in model.tags.items()]
            local = local_store().create_logged_model(
                experiment_id=experiment,
                name=model.name,
                source_run_id=copy.local_id if copy else None,
                tags=[*tags, LoggedModelTag(TAG_SERVER_MODEL, model_id)],
                params=list_params(model.params),
                model_type=model.model_type,
            )
            self.models[model_id] = local.model_id
            drop_cached_artifact_repo(model_id)
            return local.model_id

    def no_copy_error(self, run_id: str, error: BaseException | None = None):
        """Return the error for a server run that has no local copy to use."""
        reason = f" ({redact(short_reason(error))})" if error else ""
        return TrackingUnavailableError(
            f"MLflow run {run_id} is stored on the tracking server "
            f"{mask_uri(self.server_uri)}, which is not reachable{reason}, and has "
            "no local copy. Start the server and run the stage again."
        )


def copy_from_tags(local_id: str, tags: dict[str, str]) -> LocalCopy:
    """Rebuild a LocalCopy from the `offline.*` tags of a local run."""
    server_run = tags.get(TAG_SERVER_RUN)
    fallback = tags.get(TAG_FALLBACK) == "true"
    caller = local_id if fallback or not server_run else server_run
    return LocalCopy(
        caller_id=tags.get(TAG_RUN, caller),
        local_id=local_id,
        server_run_id=server_run,
        server_experiment_id=tags.get(TAG_SERVER_EXPERIMENT),
        state=tags.get(TAG_STATE, PENDING),
    )


def list_params(params: dict[str, str]) -> list:
    """Turn a logged model's params mapping into LoggedModelParameter objects."""
    from mlflow.entities import LoggedModelParameter

    return [LoggedModelParameter(k, v) for k, v in (params or {}).items()]


def now_ms() -> int:
    """Return the current time in milliseconds since the epoch."""
    return int(time.time() * 1000)


def short_reason(error: BaseException | None) -> str:
    """Describe an error in one line of at most 300 characters.

    For a network error that is its innermost cause ("[Errno 111]
    Connection refused"), not the long message that MLflow wraps around it.
    """
    innermost = error
    current, seen = error, set()
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and str(current):
            innermost = current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    text = str(innermost or "").strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def unavailable_error(server_uri: str, error: BaseException | str):
    """Return the error for a server that cannot be reached, naming the fixes."""
    reason = error if isinstance(error, str) else short_reason(error)
    return TrackingUnavailableError(
        f"MLflow tracking server {mask_uri(server_uri)} is not reachable "
        f"({redact(reason)}). Start it (`make server`, see docs/team.md), set "
        "tracking.offline_fallback=true to log to the local store and upload the "
        f"runs later with {UPLOAD_HINT}, or point tracking.uri (or "
        "MLFLOW_TRACKING_URI) at a running server."
    )


_failovers: dict[str, Failover] = {}
_registered = threading.Event()


def failover_for(uri: str | None) -> Failover | None:
    """Return the Failover of an activated server URI, else None."""
    return _failovers.get(uri or "")


def run_is_local(run_id: str) -> bool:
    """Tell whether run `run_id` is logged to the local store instead of the
    server of the current tracking URI."""
    import mlflow

    failover = failover_for(mlflow.get_tracking_uri())
    if failover is None:
        return False
    copy = failover.copy_for(run_id)
    return failover.offline or (copy is not None and copy.state == PENDING)


def activate(server_uri: str, experiment_name: str, allow_fallback: bool) -> Failover:
    """Route MLflow calls for `server_uri` through FailoverStore from now on."""
    from mlflow.tracking._tracking_service import utils

    from stages.failover_store import register_failover_classes

    for name, value in FAST_FAILURE_ENV.items():
        os.environ.setdefault(name, value)
    failover = _failovers.setdefault(server_uri, Failover(server_uri))
    failover.experiment_name = experiment_name
    failover.allow_fallback = allow_fallback
    if not _registered.is_set():
        register_failover_classes()
        _registered.set()
    # MLflow caches one store per URI; a cached plain RestStore would bypass us.
    utils._tracking_store_registry._get_store_with_resolved_uri.cache_clear()
    return failover


def reset() -> None:
    """Forget every Failover and cached local store (for tests)."""
    _failovers.clear()
    _local_stores.clear()


def pending_copies(server_uri: str | None = None) -> list[tuple[Any, LocalCopy]]:
    """Return (local run, LocalCopy) for every pending copy in the local store."""
    from stages.tracking import DB_NAME, project_root

    if not (project_root() / DB_NAME).is_file():
        return []
    from mlflow.entities import ViewType

    store = local_store()
    experiments = store.search_experiments(view_type=ViewType.ALL)
    runs = store.search_runs(
        [e.experiment_id for e in experiments],
        f"tags.`{TAG_STATE}` = '{PENDING}'",
        ViewType.ALL,
        max_results=50_000,
    )
    found = []
    for run in runs:
        if server_uri and run.data.tags.get(TAG_SERVER) != strip_credentials(
            server_uri
        ):
            continue
        found.append((run, copy_from_tags(run.info.run_id, run.data.tags)))
    return found
