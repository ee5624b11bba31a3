"""Atomic writes: an output appears under its final name only when complete.

A stage killed mid-write leaves at most a hidden temporary sibling, never a
partial file or folder that DVC or a later stage would accept. The next write
of the same output deletes such leftovers. When the disk fills up mid-write,
the temporary copy is deleted, the previous output stays as it was, and
DiskFullError names the output.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


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


def remove_stale_tmp(target: Path) -> None:
    """Delete temporary siblings that a killed run left next to `target`."""
    if not target.parent.is_dir():
        return
    for stale in target.parent.glob(f".{target.name}{TMP_MARK}*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces `target` on success.

    On an exception the temporary folder is removed and `target` is left as
    it was. The old `target` is deleted only after the new one is in place.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
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
        if stale.is_file() or stale.is_symlink():
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
