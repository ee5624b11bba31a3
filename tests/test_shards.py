"""Images in shards, streamed or loaded: random access, epoch order and
tf.data batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages.cli import InputError
from stages.shards import ShardedImages, ShardWriter


def write_shards(folder: Path, count: int, shard_size: int) -> pd.DataFrame:
    """Write `count` 3x4x1 images whose pixels all equal their number."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(folder, shard_size)
    addresses = [writer.add(np.full((3, 4, 1), i, np.uint8)) for i in range(count)]
    writer.flush()
    return pd.DataFrame(addresses, columns=["shard", "offset"])


def numbers(images: np.ndarray) -> list[int]:
    return [int(image[0, 0, 0]) for image in images]


def test_sharded_images_read_any_order(tmp_path: Path) -> None:
    rows = write_shards(tmp_path, 23, shard_size=5)
    # Rows in an order unrelated to the shard layout, as a split manifest has.
    shuffled = rows.sample(frac=1, random_state=1).reset_index(drop=True)
    expected = (shuffled["shard"] * 5 + shuffled["offset"]).tolist()
    images = ShardedImages(tmp_path, shuffled)

    assert images.shape == (23, 3, 4, 1)
    assert numbers(images[:]) == expected
    assert numbers(images.take(np.array([22, 0, 7, 7]))) == [
        expected[22],
        expected[0],
        expected[7],
        expected[7],
    ]
    assert int(images[-1][0, 0, 0]) == expected[-1]
    with pytest.raises(IndexError, match="out of range"):
        images[23]
    assert numbers(images[3:6]) == expected[3:6]
    batches = list(images.batches(10))
    assert [len(b) for b in batches] == [10, 10, 3]
    assert numbers(np.concatenate(batches)) == expected


@pytest.mark.parametrize("offset", [9, -1])
def test_sharded_images_name_overrun_shard(tmp_path: Path, offset: int) -> None:
    rows = write_shards(tmp_path, 6, shard_size=4)
    rows.loc[5, "offset"] = offset
    expected = rf"images-00001\.npy contains 2 images, .* offset {offset};"
    with pytest.raises(InputError, match=expected):
        ShardedImages(tmp_path, rows)


def damage_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-5])


def damage_empty(path: Path) -> None:
    path.write_bytes(b"")


def damage_header(path: Path) -> None:
    path.write_bytes(b"XXXXXX" + path.read_bytes()[6:])


def damage_shape(path: Path) -> None:
    np.save(path, np.zeros((4, 2, 2, 1), np.uint8))


def damage_delete(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (damage_truncate, r"is truncated: \d+ bytes, expected \d+ for 4 images"),
        (damage_empty, "is not a readable shard"),
        (damage_header, "is not a readable shard"),
        (damage_shape, r"contains images of shape \(2, 2, 1\), other shards"),
        (damage_delete, "Cannot open shard .*No such file"),
    ],
    ids=["truncated", "empty", "header", "shape", "missing"],
)
def test_shards_reject_damaged_file(tmp_path: Path, damage, expected: str) -> None:
    rows = write_shards(tmp_path, 12, shard_size=4)
    damage(tmp_path / "images-00001.npy")
    with pytest.raises(InputError, match=expected) as raised:
        ShardedImages(tmp_path, rows)
    assert "images-00001.npy" in str(raised.value)
    assert "run `dvc repro` to rebuild data/processed" in str(raised.value)


def test_shard_truncated_during_read(tmp_path: Path) -> None:
    rows = write_shards(tmp_path, 8, shard_size=4)
    images = ShardedImages(tmp_path, rows)
    shard = tmp_path / "images-00001.npy"
    shard.write_bytes(shard.read_bytes()[:-20])
    with pytest.raises(InputError, match=r"images-00001\.npy ended at image"):
        images.take(np.arange(8))


def test_sharded_images_reject_non_shard(tmp_path: Path) -> None:
    np.save(tmp_path / "images-00000.npy", np.zeros((4, 4), np.float32))
    rows = pd.DataFrame({"shard": [0], "offset": [0]})
    with pytest.raises(InputError, match="not a shard of uint8 images"):
        ShardedImages(tmp_path, rows)


def collect(dataset) -> list[tuple[list[int], list[int]]]:
    return [(numbers(x.numpy()), y.numpy().tolist()) for x, y in dataset]


def test_loaded_images_read_from_memory(tmp_path: Path) -> None:
    rows = write_shards(tmp_path, 9, shard_size=4).iloc[::-1]
    images = ShardedImages(tmp_path, rows)
    assert images.nbytes == 9 * 12
    pixels = images.load()
    assert numbers(pixels) == list(range(8, -1, -1))
    for shard in tmp_path.glob("images-*.npy"):
        shard.unlink()
    assert numbers(images.take(np.array([8, 0, 3]))) == [0, 8, 5]
    assert numbers(np.concatenate(list(images.batches(4)))) == numbers(pixels)


@pytest.mark.parametrize("loaded", [False, True], ids=["streamed", "loaded"])
def test_epochs_replay_same_order(tmp_path: Path, loaded: bool) -> None:
    from stages.training import make_epochs_dataset

    rows = write_shards(tmp_path, 11, shard_size=4)
    images = ShardedImages(tmp_path, rows)
    if loaded:
        images.load()
    labels = np.arange(11, dtype=np.int32) % 3

    full = collect(make_epochs_dataset(images, labels, 4, range(0, 3), seed=7))
    resumed = collect(make_epochs_dataset(images, labels, 4, range(1, 3), seed=7))
    assert len(full) == 9  # three batches of 4, 4 and 3 images per epoch
    assert full[3:] == resumed

    epochs = [sum((pixels for pixels, _ in full[i : i + 3]), []) for i in (0, 3, 6)]
    for order in epochs:
        assert sorted(order) == list(range(11))
    assert epochs[0] != epochs[1]
    for pixels, batch_labels in full:
        assert batch_labels == [p % 3 for p in pixels]

    other_seed = collect(make_epochs_dataset(images, labels, 4, range(0, 1), seed=8))
    assert other_seed != full[:3]


@pytest.mark.parametrize("loaded", [False, True], ids=["streamed", "loaded"])
def test_split_batches_keep_order(tmp_path: Path, loaded: bool) -> None:
    from stages.training import make_dataset

    rows = write_shards(tmp_path, 7, shard_size=3).iloc[::-1]
    images = ShardedImages(tmp_path, rows)
    if loaded:
        images.load()
    labels = np.array([0, 1, 2, 0, 1, 2, 0], np.int32)

    dataset = make_dataset(images, labels, 3, num_classes=3)
    assert int(dataset.cardinality()) == 3
    batches = [(numbers(x.numpy()), y.numpy()) for x, y in dataset]
    assert sum((pixels for pixels, _ in batches), []) == [6, 5, 4, 3, 2, 1, 0]
    one_hot = np.concatenate([y for _, y in batches])
    assert one_hot.argmax(axis=1).tolist() == labels.tolist()
