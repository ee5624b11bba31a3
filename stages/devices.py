"""Which device trains: a GPU when TensorFlow sees one, else the CPU."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def describe_devices(gpu_names: list[str]) -> str:
    """Name the training device from the list of visible GPU names."""
    if not gpu_names:
        return "CPU"
    if len(gpu_names) == 1:
        return f"GPU ({gpu_names[0]})"
    return f"{len(gpu_names)} GPUs ({', '.join(gpu_names)})"


def visible_gpus() -> list[str]:
    """List the GPUs TensorFlow can use, enabling memory growth on each.

    Memory growth keeps TensorFlow from reserving all GPU memory at start, so
    several trials can share a GPU.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as error:  # raised once the GPU is initialised
            log.debug("Memory growth unchanged on %s: %s", gpu.name, error)
    return [gpu.name for gpu in gpus]
