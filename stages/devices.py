"""The devices visible to TensorFlow: GPU names and compute capabilities."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    """A visible GPU. compute_capability is None when the driver reports none."""

    name: str
    compute_capability: tuple[int, int] | None = None


def describe_devices(gpu_names: list[str]) -> str:
    """Name the training device from the list of visible GPU names."""
    if not gpu_names:
        return "CPU"
    if len(gpu_names) == 1:
        return f"GPU ({gpu_names[0]})"
    return f"{len(gpu_names)} GPUs ({', '.join(gpu_names)})"


def visible_gpus() -> list[str]:
    """List the names of the GPUs TensorFlow can use (see `list_gpus`)."""
    return [gpu.name for gpu in list_gpus()]


def list_gpus() -> list[GpuInfo]:
    """List the GPUs TensorFlow can use, enabling memory growth on each.

    Memory growth keeps TensorFlow from reserving all GPU memory at start, so
    several trials can share a GPU.
    """
    import tensorflow as tf

    gpus = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as error:  # raised once the GPU is initialised
            log.debug("Memory growth unchanged on %s: %s", gpu.name, error)
        details = tf.config.experimental.get_device_details(gpu)
        capability = details.get("compute_capability")
        gpus.append(GpuInfo(gpu.name, tuple(capability) if capability else None))
    return gpus


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """Return the feature flags of the first CPU in `cpuinfo` (empty if unknown).

    Linux lists them on the `flags` line; other systems have no such file.
    """
    try:
        text = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()
