"""Numeric precision, distribution strategy and XLA for training.

`plan_hardware` chooses them from the train config, the visible GPUs and the
environment. It is a pure function, so every choice can be tested on a
machine without a GPU; `create_strategy` and `apply_precision` then act on
TensorFlow and Keras.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stages.config import ConfigError, TrainConfig
from stages.devices import GpuInfo

log = logging.getLogger(__name__)

TF_CONFIG = "TF_CONFIG"
# NVIDIA GPUs have float16 tensor cores from Volta (compute capability 7.0)
# on. The TensorFlow mixed precision guide notes that CPUs run float16
# operations slower than float32 ones.
MIXED_FLOAT16_MIN_CAPABILITY = (7, 0)
# CPU features with native bfloat16 arithmetic (AVX-512 BF16, AMX), which
# oneDNN uses for mixed_bfloat16 convolutions and matrix products. Without
# them bfloat16 is emulated and slower than float32.
BFLOAT16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
TF_CONFIG_EXAMPLE = (
    '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
    '"task": {"type": "worker", "index": 0}}'
)


@dataclass(frozen=True)
class HardwarePlan:
    """Hardware settings of a run: Keras dtype policy, strategy and cluster role."""

    precision: str
    strategy: str
    jit_compile: bool
    num_workers: int = 1
    is_chief: bool = True


def supports_mixed_float16(gpus: Sequence[GpuInfo]) -> bool:
    """Return whether every visible GPU has float16 tensor cores (False for none)."""
    return bool(gpus) and all(
        gpu.compute_capability is not None
        and gpu.compute_capability >= MIXED_FLOAT16_MIN_CAPABILITY
        for gpu in gpus
    )


def select_precision(
    requested: str, gpus: Sequence[GpuInfo], cpu_flags: frozenset[str] = frozenset()
) -> str:
    """Resolve train.precision.

    auto is mixed_float16 on GPUs with float16 tensor cores, mixed_bfloat16
    on a CPU (no GPU) with native bfloat16 arithmetic, else float32.
    """
    if requested != "auto":
        if requested == "mixed_float16" and not supports_mixed_float16(gpus):
            log.warning(
                "train.precision=mixed_float16 without GPUs of compute capability "
                ">= 7.0 (float16 tensor cores) can run slower than float32"
            )
        return requested
    if supports_mixed_float16(gpus):
        return "mixed_float16"
    if not gpus and cpu_flags & BFLOAT16_CPU_FLAGS:
        return "mixed_bfloat16"
    return "float32"


def read_tf_config(env: Mapping[str, str]) -> dict[str, Any] | None:
    """Parse the TF_CONFIG cluster description, or return None when it is unset.

    Raises:
        ConfigError: when TF_CONFIG is not JSON or lacks `cluster` or `task`.
    """
    text = env.get(TF_CONFIG, "").strip()
    if not text:
        return None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{TF_CONFIG}: invalid JSON ({error}); expected e.g. {TF_CONFIG_EXAMPLE}"
        ) from None
    if not isinstance(spec, dict) or not {"cluster", "task"} <= spec.keys():
        raise ConfigError(
            f"{TF_CONFIG}: needs 'cluster' and 'task' entries; "
            f"expected e.g. {TF_CONFIG_EXAMPLE}"
        )
    return spec


def is_chief(tf_config: Mapping[str, Any] | None) -> bool:
    """Return whether this process writes outputs: the chief, else worker 0."""
    if not tf_config:
        return True
    task = tf_config["task"]
    if task.get("type") == "chief":
        return True
    has_chief = bool(tf_config["cluster"].get("chief"))
    return not has_chief and task.get("type") == "worker" and task.get("index") == 0


def count_workers(tf_config: Mapping[str, Any] | None) -> int:
    """Count the processes that train: the chief and the workers."""
    if not tf_config:
        return 1
    cluster = tf_config["cluster"]
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


def select_strategy(
    requested: str, gpus: Sequence[GpuInfo], tf_config: Mapping[str, Any] | None
) -> str:
    """Resolve train.strategy to default, mirrored or multi_worker.

    auto picks mirrored when more than one GPU is visible, else default.

    Raises:
        ConfigError: multi_worker without a TF_CONFIG cluster description.
    """
    if requested == "auto":
        return "mirrored" if len(gpus) > 1 else "default"
    if requested == "multi_worker" and tf_config is None:
        raise ConfigError(
            f"train.strategy=multi_worker: the {TF_CONFIG} environment variable "
            f"is not set; set it on every worker, e.g. {TF_CONFIG_EXAMPLE}"
        )
    return requested


def plan_hardware(
    cfg: TrainConfig,
    gpus: Sequence[GpuInfo],
    env: Mapping[str, str],
    cpu_flags: frozenset[str] = frozenset(),
) -> HardwarePlan:
    """Choose precision, strategy and XLA from the config, GPUs, CPU features
    and environment."""
    tf_config = read_tf_config(env)
    strategy = select_strategy(cfg.strategy, gpus, tf_config)
    if strategy != "multi_worker":
        tf_config = None  # a cluster description matters to multi_worker only
    return HardwarePlan(
        precision=select_precision(cfg.precision, gpus, cpu_flags),
        strategy=strategy,
        jit_compile=cfg.jit_compile,
        num_workers=count_workers(tf_config),
        is_chief=is_chief(tf_config),
    )


def hardware_tags(plan: HardwarePlan, device: str, num_replicas: int) -> dict[str, str]:
    """Return the MLflow tags that record where and how the model trained."""
    return {
        "device": device,
        "precision": plan.precision,
        "strategy": plan.strategy,
        "num_replicas": str(num_replicas),
        "num_workers": str(plan.num_workers),
        "jit_compile": str(plan.jit_compile).lower(),
    }


def create_strategy(plan: HardwarePlan):
    """Create the tf.distribute strategy of `plan`.

    MultiWorkerMirroredStrategy reads TF_CONFIG, and must be created before
    TensorFlow runs any operation in the process.
    """
    import tensorflow as tf

    if plan.strategy == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if plan.strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def apply_precision(plan: HardwarePlan) -> None:
    """Set the global Keras dtype policy; layers built afterwards follow it."""
    import keras

    keras.mixed_precision.set_dtype_policy(plan.precision)


def adapt_model(model, plan: HardwarePlan):
    """Return `model`, or under multi_worker a copy that Keras can fit there.

    The copy shares `model`'s layers and weights.
    """
    if plan.strategy != "multi_worker":
        return model
    return _multi_worker_model_class()(model.inputs, model.outputs, name=model.name)


@functools.cache
def _multi_worker_model_class() -> type:
    import keras

    class MultiWorkerModel(keras.Model):
        """A functional model that keras 3.15's fit() trains on several workers.

        NOTE: keras 3.15 fit() fails in two places under
        MultiWorkerMirroredStrategy. Before training, it reduces a whole
        (x, y) batch with strategy.reduce, which this strategy rejects for
        nested values. The model is already built, so this class skips that
        step. Keras then reduces each step's scalar metrics along axis 0, so
        this class gives them a batch axis of length 1.
        """

        def _maybe_symbolic_build(self, iterator=None, data_batch=None):
            return None

        def compute_metrics(self, x, y, y_pred, sample_weight=None):
            values = super().compute_metrics(x, y, y_pred, sample_weight)
            return {k: keras.ops.expand_dims(v, 0) for k, v in values.items()}

    return MultiWorkerModel
