"""Sharded image storage: fixed-shape uint8 arrays in NumPy files.

Preprocessing appends images one by one and flushes every `shard_size`, so
its memory does not grow with the dataset. Readers memory-map the shards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

SHARD_PATTERN = "images-{:05d}.npy"


# Upper bound of one shard's size, so the writer's buffer stays small however
# large preprocess.shard_size is set.
MAX_SHARD_BYTES = 64 * 2**20


class ShardWriter:
    """Append images of one shape and write them in shards.

    A shard holds at most `shard_size` images and MAX_SHARD_BYTES bytes. The
    writer keeps one preallocated shard in memory, so its memory does not
    grow with the number of images.
    """

    def __init__(self, folder: Path, shard_size: int) -> None:
        self.folder = folder
        self.shard_size = shard_size
        self.buffer: np.ndarray | None = None
        self.count = 0
        self.num_shards = 0

    def add(self, pixels: np.ndarray) -> tuple[int, int]:
        """Queue one image and return its (shard, offset) address."""
        if self.buffer is None:
            per_image = max(1, pixels.nbytes)
            capacity = max(1, min(self.shard_size, MAX_SHARD_BYTES // per_image))
            self.buffer = np.empty((capacity, *pixels.shape), dtype=pixels.dtype)
        address = (self.num_shards, self.count)
        self.buffer[self.count] = pixels
        self.count += 1
        if self.count == len(self.buffer):
            self.flush()
        return address

    def flush(self) -> None:
        """Write the queued images as the next shard."""
        if self.buffer is None or self.count == 0:
            return
        path = self.folder / SHARD_PATTERN.format(self.num_shards)
        np.save(path, self.buffer[: self.count])
        self.count = 0
        self.num_shards += 1


def load_images(folder: Path, rows: pd.DataFrame) -> np.ndarray:
    """Gather the images addressed by `rows` (columns shard, offset), in row order."""
    shards: dict[int, np.ndarray] = {}
    for shard in rows["shard"].unique():
        shards[int(shard)] = np.load(
            folder / SHARD_PATTERN.format(shard), mmap_mode="r"
        )
    if rows.empty:
        first = np.load(folder / SHARD_PATTERN.format(0), mmap_mode="r")
        return np.zeros((0, *first.shape[1:]), dtype=np.uint8)
    return np.stack(
        [
            shards[int(s)][int(o)]
            for s, o in zip(rows["shard"], rows["offset"], strict=True)
        ]
    )
