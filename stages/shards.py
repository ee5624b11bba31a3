"""Sharded image storage: fixed-shape uint8 arrays in NumPy files.

Preprocessing appends images one by one and flushes every `shard_size`, so
its memory does not grow with the dataset. Readers memory-map the shards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

SHARD_PATTERN = "images-{:05d}.npy"


class ShardWriter:
    """Append images of one shape and write them in shards of `shard_size`."""

    def __init__(self, folder: Path, shard_size: int) -> None:
        self.folder = folder
        self.shard_size = shard_size
        self.buffer: list[np.ndarray] = []
        self.num_shards = 0

    def add(self, pixels: np.ndarray) -> tuple[int, int]:
        """Queue one image and return its (shard, offset) address."""
        address = (self.num_shards, len(self.buffer))
        self.buffer.append(pixels)
        if len(self.buffer) == self.shard_size:
            self.flush()
        return address

    def flush(self) -> None:
        """Write the queued images as the next shard."""
        if not self.buffer:
            return
        np.save(
            self.folder / SHARD_PATTERN.format(self.num_shards), np.stack(self.buffer)
        )
        self.buffer = []
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
