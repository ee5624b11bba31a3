"""Timing of child processes, peak memory of a process tree, and machine facts."""

from __future__ import annotations

import logging
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

MEMORY_POLL_SECONDS = 0.05
# CPU flags that decide TensorFlow's speed on this kind of model.
CPU_FEATURES = {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"}
VENV_BIN = Path(sys.executable).parent


class BenchError(RuntimeError):
    """Failure of a measured command, or output showing it skipped its work."""


@dataclass(frozen=True)
class Timed:
    """One finished command: wall time, CPU use, peak memory and output.

    `other_cpu_seconds` is the CPU time that processes outside the command
    used meanwhile, summed over all cores. A high value means that other work
    competed for the CPU.
    """

    seconds: float
    output: str
    cpu_seconds: float
    other_cpu_seconds: float
    peak_rss_bytes: int | None = None


def child_env() -> dict[str, str]:
    """Return the environment for measured commands.

    The venv comes first on PATH, because dvc.yaml's commands call `python`.
    MLFLOW_* and DVC_* variables of the caller are dropped, so every run logs
    to the MLflow store of its own project copy, as the test suite does.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1")
    return env


def tree_rss(process: psutil.Process) -> int:
    """Sum the resident set size of `process` and all of its descendants.

    Pages shared between a parent and its forked children count once per
    process, as in the RSS column of `ps`.
    """
    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def _busy_cpu_seconds() -> float:
    """Return the CPU seconds all cores have spent busy since boot."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _children_cpu_seconds() -> float:
    """Return the user and system CPU seconds of all waited-for descendants."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _poll_peak(pid: int, done: threading.Event, peak: list[int]) -> None:
    try:
        process = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not done.is_set():
        peak[0] = max(peak[0], tree_rss(process))
        done.wait(MEMORY_POLL_SECONDS)


def run_timed(
    command: list[str],
    cwd: Path,
    log_file: Path,
    track_memory: bool = False,
) -> Timed:
    """Run `command` to completion and return its wall time and output.

    stdout and stderr go to `log_file` and are returned. CPU time counts the
    descendants that were waited for, which are all of them unless one is
    orphaned. With `track_memory`, a thread samples the process tree's RSS
    every MEMORY_POLL_SECONDS, so a peak that lasts less than that can be
    missed.

    Raises:
        BenchError: the command exited with a non-zero status.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w", encoding="utf-8") as out:
        out.write(f"$ {' '.join(command)}\n# cwd: {cwd}\n")
        out.flush()
        busy, own = _busy_cpu_seconds(), _children_cpu_seconds()
        started = time.perf_counter()
        process = subprocess.Popen(
            command, cwd=cwd, env=child_env(), stdout=out, stderr=subprocess.STDOUT
        )
        peak, done = [0], threading.Event()
        poller = None
        if track_memory:
            poller = threading.Thread(target=_poll_peak, args=(process.pid, done, peak))
            poller.start()
        returncode = process.wait()
        seconds = time.perf_counter() - started
        cpu = _children_cpu_seconds() - own
        other_cpu = max(0.0, _busy_cpu_seconds() - busy - cpu)
        done.set()
        if poller:
            poller.join()
    output = log_file.read_text(encoding="utf-8", errors="replace")
    if returncode != 0:
        tail = "\n".join(output.splitlines()[-20:])
        raise BenchError(
            f"{' '.join(command)} failed with exit status {returncode} in {cwd}. "
            f"Full output: {log_file}. Last lines:\n{tail}"
        )
    peak_rss = peak[0] if track_memory else None
    return Timed(seconds, output, cpu, other_cpu, peak_rss)


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return platform.processor() or "unknown"
    for line in lines:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git(root: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=False
    )
    return result.stdout.strip()


def machine_facts(root: Path) -> dict:
    """Describe the CPU, memory, software versions and source commit."""
    return {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_features": sorted(_cpu_flags() & CPU_FEATURES),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": _version("tensorflow"),
        "keras": _version("keras"),
        "dvc": _version("dvc"),
        "mlflow": _version("mlflow"),
        "pillow": _version("pillow"),
        "git_commit": _git(root, "rev-parse", "--short", "HEAD"),
        "git_uncommitted_changes": bool(_git(root, "status", "--porcelain")),
    }


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def load_average() -> float:
    """Return the 1-minute load average, a count of runnable processes."""
    return round(os.getloadavg()[0], 2)
