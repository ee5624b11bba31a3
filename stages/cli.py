"""Shared entry point of the stage scripts: arguments, logging, exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable

from stages.config import ConfigError
from stages.fsutil import DiskFullError, OutputLockedError
from stages.redaction import install_log_redaction

log = logging.getLogger(__name__)


class InputError(ValueError):
    """The input data cannot be used; the message names the file and the fix."""


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr with time, level and logger name."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


# Warnings that every training run would print although nothing is wrong:
# MLflow's guesses about the local data sources and integer pixel columns
# that mlflow.log_input and the model signature describe.
QUIET_WARNINGS = (
    "The specified dataset source can be interpreted in multiple ways",
    "Hint: Inferred schema contains integer column",
)


def quiet_known_noise() -> None:
    """Hide the Python warnings listed in QUIET_WARNINGS.

    NOTE: TensorFlow 2.21 prints its start-up lines (oneDNN, CUDA drivers)
    even when TF_CPP_MIN_LOG_LEVEL=2 is set before the import, so they stay.
    """
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


def _interrupt_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"terminated by signal {signum}")


def run_stage(task: Callable[[list[str]], object], description: str) -> None:
    """Parse `key=value` overrides, run `task(overrides)` and map errors to exits.

    Configuration and input errors print one message and exit with status 2,
    a full disk or an output locked by another run with status 1, both
    without a traceback; anything else propagates. SIGTERM is turned into
    KeyboardInterrupt, so cleanup code (such as ending an MLflow run as
    KILLED) runs as it does on Ctrl-C.

    After a successful task that loaded TensorFlow, the process flushes its
    logs and exits without the interpreter's teardown, which took about 1 s
    on 2 cores. By then the outputs are renamed into place and the MLflow
    runs have ended, so the skipped exit handlers have nothing left to do.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="overrides of params.yaml in Hydra syntax, e.g. train.epochs=5",
    )
    args = parser.parse_args()
    setup_logging()
    quiet_known_noise()
    # Mask credentials in every stage's log, such as a token in dataset.url.
    install_log_redaction()
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        task(args.overrides)
    except (ConfigError, InputError) as error:
        log.error("%s", error)
        sys.exit(2)
    except (DiskFullError, OutputLockedError) as error:
        log.error("%s", error)
        sys.exit(1)
    if "tensorflow" in sys.modules:
        exit_now()


def exit_now(status: int = 0) -> None:
    """Flush logs and standard streams, then end the process with `status`
    at once, skipping exit handlers and module teardown."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)
