"""Sharded image storage: fixed-shape uint8 arrays in NumPy files.

Preprocessing appends images one by one and flushes every `shard_size`, so
its memory does not grow with the dataset. Readers memory-map the shards.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from stages.cli import InputError

SHARD_PATTERN = "images-{:05d}.npy"
REBUILD_HINT = "run `dvc repro` to rebuild data/processed"


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


class ShardedImages:
    """The images that manifest rows address, read from their shards on demand.

    Behaves like a read-only (N, H, W, C) uint8 array for `len`, `shape` and
    indexing, but keeps no pixels in memory: each access reads the addressed
    images from the shard files with positioned reads. Memory therefore does
    not grow with the number of images, and the operating system's page
    cache makes later epochs as fast as an in-memory copy when it fits.
    `load` reads them all into memory once, for callers that can afford it.
    """

    def __init__(self, folder: Path, rows: pd.DataFrame) -> None:
        self.folder = Path(folder)
        self.shard_ids = rows["shard"].to_numpy(dtype=np.int64)
        self.offsets = rows["offset"].to_numpy(dtype=np.int64)
        self._files: dict[int, _ShardFile] = {}
        first = int(self.shard_ids[0]) if len(self.shard_ids) else 0
        self.image_shape = self._file(first).image_shape
        self._check_addresses()
        # Every image in row order once `load` has run, else None.
        self.pixels: np.ndarray | None = None

    def _check_addresses(self) -> None:
        """Open every shard the rows address and check its image shape and
        the rows' offsets, so a damaged folder fails before any training.

        Raises:
            InputError: a shard is missing, damaged or of another image
                shape, or an offset lies outside its shard.
        """
        for shard in np.unique(self.shard_ids):
            shard_file = self._file(int(shard))
            if shard_file.image_shape != self.image_shape:
                raise InputError(
                    f"{shard_file.path} contains images of shape "
                    f"{shard_file.image_shape}, other shards {self.image_shape}; "
                    f"{REBUILD_HINT}"
                )
            shard_file.check_offsets(self.offsets[self.shard_ids == shard])

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.image_shape)

    @property
    def nbytes(self) -> int:
        """Return the size of all the images' pixels."""
        return len(self) * int(np.prod(self.image_shape))

    def load(self) -> np.ndarray:
        """Read every image into memory once and return them in row order.

        Later reads come from memory, and the shard files are closed.
        """
        if self.pixels is None:
            pixels = _aligned_empty(self.shape)
            self._read(np.arange(len(self)), pixels)
            self.pixels = pixels
            self.close()
        return self.pixels

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            if not -len(self) <= index < len(self):
                raise IndexError(f"image {index} is out of range for {len(self)}")
            return self.take(np.array([index % len(self)]))[0]
        return self.take(np.arange(len(self))[index])

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Return the images at `indices` (positions in the rows), in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.pixels is not None:
            return self.pixels[indices]
        out = np.empty((len(indices), *self.image_shape), dtype=np.uint8)
        self._read(indices, out)
        return out

    def _read(self, indices: np.ndarray, out: np.ndarray) -> None:
        """Read the images at `indices` from their shards into `out`, in order."""
        shard_ids = self.shard_ids[indices]
        for shard in np.unique(shard_ids):
            where = np.flatnonzero(shard_ids == shard)
            # Ascending offsets turn neighbouring images into forward reads.
            where = where[np.argsort(self.offsets[indices[where]], kind="stable")]
            self._file(int(shard)).read(self.offsets[indices[where]], out, where)

    def batches(self, batch_size: int, order: np.ndarray | None = None):
        """Yield the images in `order` (default: row order) in batches."""
        order = np.arange(len(self)) if order is None else order
        for start in range(0, len(order), batch_size):
            yield self.take(order[start : start + batch_size])

    def close(self) -> None:
        for shard in self._files.values():
            shard.close()
        self._files.clear()

    def _file(self, shard: int) -> _ShardFile:
        if shard not in self._files:
            self._files[shard] = _ShardFile(self.folder / SHARD_PATTERN.format(shard))
        return self._files[shard]


class _ShardFile:
    """One shard opened for positioned reads of single images.

    Raises:
        InputError: the file is missing, is not a NumPy file of uint8 images,
            or is shorter than its header declares.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            # Unbuffered, and closed by the garbage collector if close() is
            # not called.
            self.file = open(path, "rb", buffering=0)  # noqa: SIM115
        except OSError as error:
            raise InputError(
                f"Cannot open shard {path}: {error.strerror}; {REBUILD_HINT}"
            ) from None
        try:
            version = np.lib.format.read_magic(self.file)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(self.file)
        except (ValueError, OSError) as error:
            self.file.close()
            raise InputError(
                f"{path} is not a readable shard ({error}); {REBUILD_HINT}"
            ) from None
        self.data_start = self.file.tell()
        if fortran or dtype != np.uint8 or len(shape) != 4:
            self.file.close()
            raise InputError(
                f"{path} is not a shard of uint8 images (shape {shape}, {dtype}); "
                f"{REBUILD_HINT}"
            )
        self.count = shape[0]
        self.image_shape = tuple(shape[1:])
        self.image_bytes = int(np.prod(self.image_shape))
        expected = self.data_start + self.count * self.image_bytes
        size = os.fstat(self.file.fileno()).st_size
        if size < expected:
            self.file.close()
            raise InputError(
                f"{path} is truncated: {size} bytes, expected {expected} for "
                f"{self.count} images; {REBUILD_HINT}"
            )

    def check_offsets(self, offsets: np.ndarray) -> None:
        """Raise InputError if an offset lies outside this shard."""
        outside = offsets[(offsets < 0) | (offsets >= self.count)]
        if len(outside):
            raise InputError(
                f"{self.path} contains {self.count} images, but a manifest row "
                f"refers to offset {int(outside[0])}; run `dvc repro` to rebuild "
                "the split manifests"
            )

    def read(self, offsets: np.ndarray, out: np.ndarray, positions: np.ndarray) -> None:
        """Read the images at `offsets`, which `check_offsets` accepted, into
        out[positions]."""
        for offset, position in zip(offsets, positions, strict=True):
            start = self.data_start + int(offset) * self.image_bytes
            data = os.pread(self.file.fileno(), self.image_bytes, start)
            if len(data) != self.image_bytes:
                raise InputError(
                    f"{self.path} ended at image {int(offset)}: it was truncated "
                    f"while being read; {REBUILD_HINT}"
                )
            out[position] = np.frombuffer(data, np.uint8).reshape(self.image_shape)

    def close(self) -> None:
        self.file.close()


def _aligned_empty(shape: tuple[int, ...], alignment: int = 64) -> np.ndarray:
    """Return an uninitialised uint8 array whose data starts on `alignment` bytes.

    TensorFlow copies a NumPy array into a tensor. In a measurement on
    TensorFlow 2.21, a 75 MiB array at a 16-byte boundary raised memory by
    159 MiB during that copy, and a 64-byte aligned one by 75 MiB.
    """
    size = int(np.prod(shape))
    buffer = np.empty(size + alignment, dtype=np.uint8)
    start = -buffer.ctypes.data % alignment
    return buffer[start : start + size].reshape(shape)


def load_images(folder: Path, rows: pd.DataFrame) -> np.ndarray:
    """Gather the images addressed by `rows` (columns shard, offset), in row order."""
    images = ShardedImages(folder, rows)
    try:
        return images.take(np.arange(len(images)))
    finally:
        images.close()
