"""Atomic writes when several real processes write the same output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.fsutil import (
    OutputLockedError,
    atomic_dir,
    remove_stale_tmp,
    write_text,
)
from tests.services import clean_env

# Writes `target` with atomic_dir or atomic_file, prints the temporary path,
# then waits for a line on stdin before it finishes the write.
WRITER = """
import sys
from pathlib import Path
from stages.fsutil import atomic_dir, atomic_file

kind, target = sys.argv[1], Path(sys.argv[2])
with (atomic_dir if kind == "dir" else atomic_file)(target) as tmp:
    (tmp / "data.txt" if kind == "dir" else tmp).write_text("from the writer")
    print(tmp, flush=True)
    sys.stdin.readline()
"""


def start_writer(kind: str, target: Path) -> tuple[subprocess.Popen, Path]:
    """Start a process that stays in the middle of writing `target`."""
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, kind, str(target)],
        env=clean_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline().strip()
    assert line, process.communicate()[1]
    return process, Path(line)


def finish_writer(process: subprocess.Popen) -> None:
    """Let a writer from `start_writer` complete, and check that it succeeded."""
    errors = process.communicate("\n", timeout=30)[1]
    assert process.returncode == 0, errors


def test_atomic_dir_second_writer_stopped(tmp_path: Path) -> None:
    target = tmp_path / "processed"
    writer, tmp = start_writer("dir", target)
    try:
        with pytest.raises(OutputLockedError) as error:
            with atomic_dir(target):
                pytest.fail("a second writer entered the locked output")
        writer_tmp_kept = tmp.is_dir()
    finally:
        finish_writer(writer)

    message = str(error.value)
    assert f"{target} is being written by process {writer.pid}" in message
    assert str(tmp_path / ".processed.lock") in message
    assert writer_tmp_kept
    assert (target / "data.txt").read_text() == "from the writer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["processed"]


def test_atomic_dir_lock_released_on_kill(tmp_path: Path) -> None:
    target = tmp_path / "processed"
    writer, tmp = start_writer("dir", target)
    writer.kill()
    writer.communicate(timeout=30)
    assert tmp.is_dir()

    with atomic_dir(target) as new_tmp:
        (new_tmp / "data.txt").write_text("second")

    assert (target / "data.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["processed"]


def test_atomic_file_keeps_running_writers_tmp(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    writer, tmp = start_writer("file", target)
    try:
        write_text(target, "from this process")
        writer_tmp_kept = tmp.read_text()
        written = target.read_text()
    finally:
        finish_writer(writer)

    assert writer_tmp_kept == "from the writer"
    assert written == "from this process"
    assert target.read_text() == "from the writer"


def test_remove_stale_tmp_by_process(tmp_path: Path) -> None:
    target = tmp_path / "raw"
    running = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    names = {
        f".raw.tmp-{running.pid}": True,
        f".raw.tmp-{ended.pid}": False,
        f".raw.tmp-old-{ended.pid}": False,
        f".raw.tmp-{ended.pid}-archive-x1": False,
        f".raw.tmp-{os.getpid()}": False,
        ".raw.tmp-killed": False,
    }
    for name in names:
        (tmp_path / name).mkdir()
    try:
        remove_stale_tmp(target)
    finally:
        running.communicate(b"")

    remaining_names = {p.name for p in tmp_path.iterdir()}
    assert remaining_names == {name for name, is_kept in names.items() if is_kept}
