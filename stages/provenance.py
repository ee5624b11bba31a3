"""Where a run's inputs came from: config overrides and content hashes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from stages.config import CONF_DIR, ConfigError, compose_group


def _hydra_value(value: Any) -> str:
    """Format a value in Hydra's override grammar."""
    if isinstance(value, str):
        plain = value and all(c.isalnum() or c in "_-./:" for c in value)
        return value if plain else "'" + value.replace("'", "\\'") + "'"
    return json.dumps(value)


def load_option(root: Path, group: str, option: str) -> dict:
    """Return one group option's values, composing only files that need it.

    A plain option file is read as YAML, which is much faster than starting
    Hydra's composition for every option.
    """
    path = root / CONF_DIR / group / f"{option}.yaml"
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if "defaults" in values or any("${" in str(v) for v in values.values()):
        return compose_group(root, group, option)
    return values


def _closest_option(root: Path, section: str, values: dict) -> tuple[str, dict]:
    """Return the conf/<section>/ option that differs from `values` in fewest keys."""
    best: tuple[int, str, dict] | None = None
    for option in sorted(p.stem for p in (root / CONF_DIR / section).glob("*.yaml")):
        composed = load_option(root, section, option)
        keys = set(composed) | set(values)
        differing = sum(composed.get(k) != values.get(k) for k in keys)
        if best is None or differing < best[0]:
            best = (differing, option, composed)
    if best is None:
        raise ConfigError(f"{CONF_DIR}/{section}/ has no options")
    return best[1], best[2]


def describe_overrides(params: dict[str, Any], root: Path) -> list[str]:
    """List the overrides that turn the default composition of conf/ into `params`.

    A section that matches another group option best is written as a group
    swap (`model=cnn_small`) followed by its remaining key changes.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(root / CONF_DIR), version_base=None):
        defaults = OmegaConf.to_container(compose(config_name="config"), resolve=True)
    overrides = []
    for section, values in params.items():
        base = defaults.get(section)
        if base == values or not isinstance(values, dict):
            continue
        if (root / CONF_DIR / section).is_dir():
            option, closest = _closest_option(root, section, values)
            if closest != load_option(root, section, defaults_option(root, section)):
                overrides.append(f"{section}={option}")
            base = closest
        for key, value in values.items():
            if (base or {}).get(key) != value:
                overrides.append(f"{section}.{key}={_hydra_value(value)}")
    return overrides


def defaults_option(root: Path, group: str) -> str:
    """Return the option that conf/config.yaml's defaults list picks for `group`."""
    config = yaml.safe_load((root / CONF_DIR / "config.yaml").read_text())
    for entry in config.get("defaults", []):
        if isinstance(entry, dict) and group in entry:
            return str(entry[group])
    raise KeyError(f"{group} is not in the defaults list of {CONF_DIR}/config.yaml")


def hash_files(paths: list[Path]) -> str:
    """Return a SHA-256 over the names and contents of `paths`, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def hash_folder(folder: Path) -> str:
    """Return a SHA-256 over every file under `folder`, by relative path."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hash_files([path]).encode())
    return digest.hexdigest()
