"""Masking of secrets in URIs, configuration values, run tags and log records.

Tracking URIs and the whole configuration end up in log lines, run
parameters and tags. A URI may carry a password (`http://user:pass@host`,
`postgresql://user:pass@db/mlflow`) or a token in its query, and an
environment variable may hold a token that a user pasted into an override.
Every such value is replaced with MASK before the project logs or records it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

MASK = "***"
# Words that mark an environment variable, config key or query parameter as secret.
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL")
# Shorter values ("1", "yes") would mask unrelated text wherever they occur.
MIN_SECRET_LENGTH = 4
NOT_SECRET_VALUES = {"true", "false", "none", "null"}

_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s?#'\"]+)@"
)
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;][^=&#\s]*(?:"
    + "|".join(SECRET_WORDS)
    + r")[^=&#\s]*)=(?P<value>[^&#\s'\"]*)",
    flags=re.IGNORECASE,
)
# A user name alone (postgresql://mlflow@/db) is no secret; anything longer or
# mixed-case, such as a token used as the user name, is masked.
_PLAIN_USER = re.compile(r"[a-z_][a-z0-9_.\-]{0,31}")


def is_secret_name(name: str) -> bool:
    """Tell whether a variable or key name marks its value as secret."""
    upper = name.upper()
    return any(word in upper for word in SECRET_WORDS)


def _mask_userinfo(match: re.Match) -> str:
    userinfo = match["userinfo"]
    user, has_password, _ = userinfo.partition(":")
    if has_password:
        masked = f"{user}:{MASK}"
    elif _PLAIN_USER.fullmatch(userinfo):
        masked = userinfo
    else:
        masked = MASK
    return f"{match['scheme']}{masked}@"


def mask_uri(text: str) -> str:
    """Mask passwords and tokens inside every URI in `text`.

    `http://user:pass@host` becomes `http://user:***@host`, a token given as
    the user name becomes `***`, and values of query parameters whose name
    contains a secret word (`?password=...`, `&token=...`) become `***`.
    """
    text = _USERINFO.sub(_mask_userinfo, text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}={MASK}", text)


def strip_credentials(uri: str) -> str:
    """Return `uri` without its user information, for storing it on disk."""
    return _USERINFO.sub(lambda m: m["scheme"], uri)


def secret_env_values() -> list[str]:
    """Return the values of secret-looking environment variables, longest first."""
    values = {
        value
        for name, value in os.environ.items()
        if is_secret_name(name)
        and len(value) >= MIN_SECRET_LENGTH
        and value.lower() not in NOT_SECRET_VALUES
    }
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """Mask URI credentials and the values of secret environment variables."""
    text = mask_uri(text)
    for value in secret_env_values():
        text = text.replace(value, MASK)
    return text


def redact_value(key: str, value: str) -> str:
    """Mask a config or tag value; the whole value when its key looks secret."""
    leaf = key.rsplit(".", 1)[-1]
    if is_secret_name(leaf) and value not in ("", "null", "None"):
        return MASK
    return redact(value)


def redact_flat(values: Mapping[str, str]) -> dict[str, str]:
    """Apply `redact_value` to every entry of a flat key-value mapping."""
    return {key: redact_value(key, str(value)) for key, value in values.items()}


def redact_config(config: Any, key: str = "") -> Any:
    """Return a copy of a nested config with every secret value masked."""
    if isinstance(config, Mapping):
        return {
            name: redact_config(value, f"{key}.{name}" if key else str(name))
            for name, value in config.items()
        }
    if isinstance(config, list):
        return [redact_config(item, key) for item in config]
    if isinstance(config, str):
        return redact_value(key, config)
    return config


class RedactingFilter(logging.Filter):
    """Mask secrets in a log record's message and traceback before output."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True  # the handler reports the malformed call itself
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            formatted = logging.Formatter().formatException(record.exc_info)
            record.exc_text = redact(formatted)
        return True


def _redacting_excepthook(hook):
    def excepthook(kind, error, traceback) -> None:
        import traceback as tb

        text = "".join(tb.format_exception(kind, error, traceback))
        if redact(text) == text:
            hook(kind, error, traceback)
        else:
            sys.stderr.write(redact(text))

    excepthook.redacting = True
    return excepthook


def install_log_redaction() -> None:
    """Add RedactingFilter to the root and MLflow log handlers, and mask
    uncaught tracebacks. Calling it again changes nothing."""
    loggers = [logging.getLogger(), logging.getLogger("mlflow")]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
    if not getattr(sys.excepthook, "redacting", False):
        sys.excepthook = _redacting_excepthook(sys.excepthook)
