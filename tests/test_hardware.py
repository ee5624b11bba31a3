"""Precision, strategy and cluster role chosen from GPUs, config and environment,
and a real two-worker training run on CPU."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stages.config import ConfigError, TrainConfig
from stages.devices import GpuInfo
from stages.hardware import (
    count_workers,
    hardware_tags,
    is_chief,
    plan_hardware,
    read_tf_config,
    select_precision,
    select_strategy,
)
from tests.conftest import client_for

TRAIN = TrainConfig(epochs=1, batch_size=32, optimizer="adam", learning_rate=0.001)
VOLTA = GpuInfo("/physical_device:GPU:0", (7, 0))
PASCAL = GpuInfo("/physical_device:GPU:1", (6, 1))
UNKNOWN = GpuInfo("/physical_device:GPU:2", None)


def cluster(task_type: str = "worker", index: int = 0, chief: bool = False) -> dict:
    spec = {"worker": ["127.0.0.1:1001", "127.0.0.1:1002"]}
    if chief:
        spec["chief"] = ["127.0.0.1:1000"]
    return {"cluster": spec, "task": {"type": task_type, "index": index}}


@pytest.mark.parametrize(
    ("requested", "gpus", "expected"),
    [
        ("auto", [], "float32"),
        ("auto", [VOLTA], "mixed_float16"),
        ("auto", [GpuInfo("a100", (8, 0)), GpuInfo("t4", (7, 5))], "mixed_float16"),
        ("auto", [PASCAL], "float32"),
        ("auto", [VOLTA, PASCAL], "float32"),
        ("auto", [UNKNOWN], "float32"),
        ("float32", [VOLTA], "float32"),
        ("mixed_bfloat16", [], "mixed_bfloat16"),
        ("mixed_float16", [], "mixed_float16"),
    ],
)
def test_hardware_precision(requested: str, gpus: list, expected: str) -> None:
    assert select_precision(requested, gpus) == expected


BF16_CPU = frozenset({"avx2", "avx512f", "avx512_bf16"})


@pytest.mark.parametrize(
    ("requested", "gpus", "flags", "expected"),
    [
        ("auto", [], BF16_CPU, "mixed_bfloat16"),
        ("auto", [], frozenset({"avx2", "amx_bf16", "amx_tile"}), "mixed_bfloat16"),
        ("auto", [], frozenset({"avx2", "avx512f"}), "float32"),
        ("auto", [VOLTA], BF16_CPU, "mixed_float16"),
        ("auto", [PASCAL], BF16_CPU, "float32"),  # the GPU trains, not the CPU
        ("float32", [], BF16_CPU, "float32"),
    ],
)
def test_hardware_precision_on_bfloat16_cpus(
    requested: str, gpus: list, flags: frozenset, expected: str
) -> None:
    assert select_precision(requested, gpus, flags) == expected


def test_cpu_flags_read_from_cpuinfo(tmp_path: Path) -> None:
    from stages.devices import cpu_flags

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\n"
        "processor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n"
    )
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize(
    ("requested", "gpus", "expected"),
    [
        ("auto", [], "default"),
        ("auto", [VOLTA], "default"),
        ("auto", [VOLTA, PASCAL], "mirrored"),
        ("default", [VOLTA, PASCAL], "default"),
        ("mirrored", [], "mirrored"),
    ],
)
def test_hardware_strategy(requested: str, gpus: list, expected: str) -> None:
    assert select_strategy(requested, gpus, None) == expected


def test_hardware_multi_worker_needs_tf_config() -> None:
    with pytest.raises(ConfigError, match="TF_CONFIG environment variable"):
        select_strategy("multi_worker", [], None)
    assert select_strategy("multi_worker", [], cluster()) == "multi_worker"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{not json", "invalid JSON"),
        ('{"cluster": {}}', "needs 'cluster' and 'task'"),
        ("[1, 2]", "needs 'cluster' and 'task'"),
    ],
)
def test_hardware_rejects_bad_tf_config(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        read_tf_config({"TF_CONFIG": text})


def test_hardware_reads_tf_config() -> None:
    assert read_tf_config({}) is None
    assert read_tf_config({"TF_CONFIG": "  "}) is None
    assert read_tf_config({"TF_CONFIG": json.dumps(cluster())}) == cluster()


@pytest.mark.parametrize(
    ("spec", "chief"),
    [
        (None, True),
        (cluster("worker", 0), True),
        (cluster("worker", 1), False),
        (cluster("chief", 0, chief=True), True),
        (cluster("worker", 0, chief=True), False),
    ],
)
def test_hardware_chief_role(spec: dict | None, chief: bool) -> None:
    assert is_chief(spec) is chief


def test_hardware_counts_workers() -> None:
    assert count_workers(None) == 1
    assert count_workers(cluster()) == 2
    assert count_workers(cluster(chief=True)) == 3


def test_hardware_plan_from_config_and_env() -> None:
    multi = dataclasses.replace(TRAIN, strategy="multi_worker", jit_compile=True)
    env = {"TF_CONFIG": json.dumps(cluster("worker", 1))}
    plan = plan_hardware(multi, [VOLTA], env)
    assert plan.precision == "mixed_float16"
    assert plan.strategy == "multi_worker"
    assert plan.jit_compile is True
    assert plan.num_workers == 2
    assert plan.is_chief is False

    # Without multi_worker, a TF_CONFIG in the environment changes nothing.
    single = plan_hardware(TRAIN, [], env)
    assert single.strategy == "default"
    assert single.num_workers == 1
    assert single.is_chief is True
    assert hardware_tags(single, "CPU", 1) == {
        "device": "CPU",
        "precision": "float32",
        "strategy": "default",
        "num_replicas": "1",
        "num_workers": "1",
        "jit_compile": "false",
    }


def free_ports(count: int) -> list[int]:
    """Reserve `count` distinct free TCP ports on 127.0.0.1, then release them."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def small_copy(source: Path, target: Path, rows: dict[str, int]) -> Path:
    """Copy a prepared project, keeping the first `rows[split]` manifest rows."""
    target.mkdir(parents=True)
    for name in ("conf", "data/processed", "data/split"):
        shutil.copytree(source / name, target / name)
    shutil.copy(source / "params.yaml", target / "params.yaml")
    for split, count in rows.items():
        manifest = target / "data/split" / f"{split}.csv"
        lines = manifest.read_text().splitlines()
        manifest.write_text("\n".join(lines[: count + 1]) + "\n")
    return target


def stop(process: subprocess.Popen) -> None:
    """Kill `process` if it is still running."""
    if process.poll() is None:
        process.kill()
        process.wait()


def stage_env() -> dict[str, str]:
    """The environment of a stage subprocess, without MLflow or DVC settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", TF_CPP_MIN_LOG_LEVEL="2")
    return env


def test_hardware_two_workers_train_on_cpu(
    digits_project: Path, tmp_path: Path
) -> None:
    project = small_copy(
        digits_project, tmp_path / "project", {"train": 128, "val": 64}
    )
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    command = [
        sys.executable,
        "-m",
        "stages.train",
        "model=cnn_small",
        "train.epochs=1",
        "train.strategy=multi_worker",
        "tracking.log_model=false",
    ]
    log_files = [tmp_path / f"worker{index}.log" for index in range(2)]
    with contextlib.ExitStack() as stack:
        workers = []
        for index, log_file in enumerate(log_files):
            env = stage_env()
            env["TF_CONFIG"] = json.dumps(
                {
                    "cluster": {"worker": addresses},
                    "task": {"type": "worker", "index": index},
                }
            )
            output = stack.enter_context(log_file.open("w"))
            workers.append(
                subprocess.Popen(
                    command, cwd=project, env=env, stdout=output, stderr=output
                )
            )
            stack.callback(stop, workers[-1])
        codes = [worker.wait(timeout=240) for worker in workers]
    logs = [log_file.read_text() for log_file in log_files]
    assert codes == [0, 0], logs[codes.index(max(codes))][-3000:]
    assert "Worker finished" in logs[1]
    assert (project / "models/model.keras").stat().st_size > 10_000

    metrics = json.loads((project / "metrics/train.json").read_text())
    assert metrics["epochs"] == 1
    run = client_for(project).get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["strategy"] == "multi_worker"
    assert run.data.tags["num_replicas"] == "2"
    assert run.data.tags["num_workers"] == "2"
    assert len(client_for(project).search_runs([run.info.experiment_id])) == 1
