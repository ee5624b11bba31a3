"""Atomic writes: an output appears under its final name only when complete.

A stage killed mid-write leaves at most a hidden temporary sibling, never a
partial file or folder that DVC or a later stage would accept. Temporary names
carry the writer's process id, and the next write of the same output deletes
the leftovers of processes that no longer run. When the disk fills up
mid-write, the temporary copy is deleted, the previous output stays as it was,
and DiskFullError names the output.

A folder output is written under a lock (`.NAME.lock` beside it), so a second
process that starts writing the same folder stops at once with
OutputLockedError instead of racing the first.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"
LOCK_SUFFIX = ".lock"
# The process id in a temporary name: `.NAME.tmp-PID`, `.NAME.tmp-old-PID`,
# `.STEM.tmp-PID.SUFFIX`, or `.NAME.tmp-PID-...` for scratch folders.
_TMP_PID = re.compile(r"(?:old-)?(\d+)")


class DiskFullError(OSError):
    """The file system ran out of space while an output was being written."""

    def __init__(self, target: Path) -> None:
        folder = next((p for p in Path(target).absolute().parents if p.is_dir()), None)
        usage = shutil.disk_usage(folder) if folder else None
        space = (
            f" ({usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB "
            f"on the file system of {folder})"
            if usage
            else ""
        )
        message = (
            f"Disk full: no space left on the device while writing {target}{space}. "
            f"The previous {target} is unchanged. Free some space and run the "
            "stage again."
        )
        super().__init__(errno.ENOSPC, message, str(target))

    def __str__(self) -> str:
        return self.strerror


class OutputLockedError(OSError):
    """Another process holds the lock of the output folder that is to be written."""

    def __init__(self, target: Path, lock_file: Path, holder: int | None) -> None:
        writer = f"process {holder}" if holder else "another process"
        message = (
            f"{target} is being written by {writer}, which holds the lock "
            f"{lock_file}. Two runs cannot write the same output at once: wait "
            "until the other run ends, then run this stage again."
        )
        super().__init__(errno.EWOULDBLOCK, message, str(target))

    def __str__(self) -> str:
        return self.strerror


def _is_disk_full(error: BaseException) -> bool:
    """Tell whether `error` or one of its causes is an ENOSPC OSError."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno in (
            errno.ENOSPC,
            errno.EDQUOT,
        ):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _tmp_sibling(target: Path) -> Path:
    return target.with_name(f".{target.name}{TMP_MARK}{os.getpid()}")


def _is_running(pid: int) -> bool:
    """Tell whether a process with id `pid` exists."""
    if pid <= 0:
        return False  # os.kill(0, ...) would signal this process group
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, but belongs to another user
    return True


def _is_stale(tmp: Path, prefix: str) -> bool:
    """Tell whether `tmp`, named `prefix` + process id + ..., is left over.

    A temporary of another running process is in use, so it is kept. One of
    this process is stale, because each write removes its own temporary when
    it ends. A name without a process id counts as stale.
    """
    # NOTE: a process id means this machine's process. Two machines or
    # containers (separate PID namespaces) writing one shared folder see each
    # other's temporaries as stale.
    match = _TMP_PID.match(tmp.name[len(prefix) :])
    if match is None:
        return True
    pid = int(match.group(1))
    return pid == os.getpid() or not _is_running(pid)


def remove_stale_tmp(target: Path) -> None:
    """Delete temporary siblings of `target` whose writing process has ended."""
    if not target.parent.is_dir():
        return
    prefix = f".{target.name}{TMP_MARK}"
    for stale in target.parent.glob(f"{prefix}*"):
        if not _is_stale(stale, prefix):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _lock_holder(descriptor: int) -> int | None:
    """Return the running process id written in a lock file, else None."""
    text = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip()
    pid = int(text) if text.isdigit() else None
    return pid if pid is not None and _is_running(pid) else None


@contextmanager
def output_lock(target: Path) -> Iterator[Path]:
    """Hold an exclusive lock on `target`, or raise OutputLockedError at once.

    The lock is an flock on `.NAME.lock` beside `target`, so the kernel
    releases it when the process ends, even on SIGKILL. The file contains
    the owner's process id for the error message and is deleted on release.
    """
    lock_file = target.with_name(f".{target.name}{LOCK_SUFFIX}")
    while True:
        descriptor = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(descriptor)
            os.close(descriptor)
            raise OutputLockedError(target, lock_file, holder) from None
        # The previous owner deletes the file on release. If it did so after
        # the open above, this lock is on a deleted file, so open the new one.
        try:
            current = os.stat(lock_file)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(descriptor), current):
            break
        os.close(descriptor)
    try:
        try:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            # On a full disk the lock still holds. Only the error message of a
            # second run then lacks this process id.
            pass
        yield lock_file
    finally:
        lock_file.unlink(missing_ok=True)
        os.close(descriptor)


@contextmanager
def waiting_lock(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock_file`, waiting while another process
    holds it. The file is left in place, so every process locks the same one."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces `target` on success.

    On an exception the temporary folder is removed and `target` is left as
    it was. The old `target` is deleted only after the new one is in place.

    Raises:
        OutputLockedError: If another process is writing `target`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(target):
        remove_stale_tmp(target)
        tmp = _tmp_sibling(target)
        try:
            tmp.mkdir()
            yield tmp
        except BaseException as error:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(error, DiskFullError) or not _is_disk_full(error):
                raise
            raise DiskFullError(target) from error
        old = target.with_name(f".{target.name}{TMP_MARK}old-{os.getpid()}")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path (same suffix) that replaces `target` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.stem}{TMP_MARK}"
    for stale in target.parent.glob(f"{prefix}*{target.suffix}"):
        if (stale.is_file() or stale.is_symlink()) and _is_stale(stale, prefix):
            stale.unlink(missing_ok=True)
    tmp = target.with_name(f"{prefix}{os.getpid()}{target.suffix}")
    try:
        yield tmp
        # Written data may only meet a full disk when it is flushed.
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, DiskFullError) or not _is_disk_full(error):
            raise
        raise DiskFullError(target) from error
    os.replace(tmp, target)


def write_text(target: Path, text: str) -> None:
    """Write `text` to `target` atomically."""
    with atomic_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: Path, data: Any) -> None:
    """Write `data` as indented JSON to `target` atomically."""
    write_text(target, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
