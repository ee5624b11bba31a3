"""Decode a folder of class sub-folders into shards and an index table."""

from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from stages.images import (
    DecodedImage,
    DecodeSettings,
    ImageError,
    decode_image,
    is_ignored,
)
from stages.shards import ShardWriter

log = logging.getLogger(__name__)

INDEX_COLUMNS = [
    "file",
    "label",
    "class_index",
    "sha256",
    "width",
    "height",
    "mode",
    "format",
    "shard",
    "offset",
]
SKIPPED_COLUMNS = ["file", "reason"]


@dataclass(frozen=True)
class SourceFile:
    """One candidate image: its path relative to the raw folder and its class."""

    relative: str
    label: str


def discover(raw_dir: Path) -> tuple[list[SourceFile], list[dict[str, str]]]:
    """List the files of each class folder, in a stable order.

    Hidden and system files and folders are left out silently. Files outside
    any class folder are returned as skipped, with the reason.
    """
    files, skipped = [], []
    for entry in sorted(raw_dir.iterdir()):
        if is_ignored(entry.name):
            continue
        if not entry.is_dir():
            skipped.append({"file": entry.name, "reason": "not inside a class folder"})
            continue
        for path in sorted(entry.rglob("*")):
            relative = path.relative_to(raw_dir)
            if path.is_file() and not any(is_ignored(p) for p in relative.parts):
                files.append(SourceFile(relative.as_posix(), entry.name))
    return files, skipped


def _decode(task: tuple[Path, DecodeSettings]) -> DecodedImage | str:
    try:
        return decode_image(*task)
    except ImageError as error:
        return str(error)
    except OSError as error:
        return f"cannot read file ({error.strerror or error})"


def _decoded_stream(
    raw_dir: Path, files: list[SourceFile], settings: DecodeSettings, workers: int
):
    tasks = ((raw_dir / f.relative, settings) for f in files)
    bar = dict(total=len(files), desc="decode", unit="img", mininterval=1.0)
    if workers <= 1:
        yield from tqdm(map(_decode, tasks), **bar)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from tqdm(pool.map(_decode, tasks, chunksize=32), **bar)


def preprocess_folder(
    raw_dir: Path,
    output_dir: Path,
    settings: DecodeSettings,
    shard_size: int,
    workers: int = 0,
    fail_on_error: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decode every image under `raw_dir` into shards in `output_dir`.

    Args:
        workers: worker processes; 0 uses every CPU core.
        fail_on_error: raise on the first unusable file instead of skipping it.

    Returns:
        The index table (one row per image) and the skipped-files table.

    Raises:
        ImageError: with `fail_on_error`, naming the first unusable file.
    """
    files, skipped = discover(raw_dir)
    workers = workers or os.cpu_count() or 1
    log.info(
        "Found %d files in %s; decoding with %d workers", len(files), raw_dir, workers
    )
    writer = ShardWriter(output_dir, shard_size)
    rows = []
    results = _decoded_stream(raw_dir, files, settings, workers)
    for source, result in zip(files, results, strict=True):
        if isinstance(result, str):
            if fail_on_error:
                raise ImageError(f"{raw_dir / source.relative}: {result}")
            skipped.append({"file": source.relative, "reason": result})
            continue
        shard, offset = writer.add(result.pixels)
        rows.append(
            [
                source.relative,
                source.label,
                -1,
                result.sha256,
                result.original_width,
                result.original_height,
                result.original_mode,
                result.format,
                shard,
                offset,
            ]
        )
    writer.flush()
    index = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    classes = sorted(index["label"].unique())
    index["class_index"] = index["label"].map({c: i for i, c in enumerate(classes)})
    return index, pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)


def class_problems(
    raw_dir: Path, index: pd.DataFrame, min_images: int
) -> tuple[list[str], list[str]]:
    """Find class folders with no usable image and classes below `min_images`.

    Returns:
        The empty class names and the small class names, each sorted.
    """
    folders = {
        p.name for p in raw_dir.iterdir() if p.is_dir() and not is_ignored(p.name)
    }
    counts = index["label"].value_counts()
    empty = sorted(folders - set(counts.index))
    small = sorted(label for label, n in counts.items() if n < min_images)
    return empty, small


def drop_small_classes(
    index: pd.DataFrame, skipped: pd.DataFrame, small: list[str], min_images: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Move the images of `small` classes from the index to the skipped table."""
    dropped = index["label"].isin(small)
    counts = index["label"].value_counts()
    reasons = [
        f"class '{label}' has {counts[label]} images, below "
        f"preprocess.min_images_per_class={min_images}"
        for label in index.loc[dropped, "label"]
    ]
    moved = pd.DataFrame({"file": index.loc[dropped, "file"], "reason": reasons})
    kept = index[~dropped].reset_index(drop=True)
    classes = sorted(kept["label"].unique())
    kept["class_index"] = kept["label"].map({c: i for i, c in enumerate(classes)})
    return kept, pd.concat([skipped, moved], ignore_index=True)


def summarise_skipped(skipped: pd.DataFrame, examples: int = 3) -> str:
    """Describe skipped files in one line: count per reason and a few examples."""
    reasons = Counter(skipped["reason"])
    shown = "; ".join(f"{r} ({n})" for r, n in reasons.most_common(examples))
    files = ", ".join(skipped["file"].head(examples))
    return f"{len(skipped)} skipped: {shown}; e.g. {files}"
