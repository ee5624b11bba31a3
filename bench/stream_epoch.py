"""Stream one shuffled training epoch from a project's shards, without a model.

`python -m bench.stream_epoch PROJECT --batch-size 32` reads
PROJECT/data/processed/index.csv, builds the training pipeline that the train
stage uses over every indexed image, pulls one epoch of batches through it
and prints one JSON object: the image count, the bytes read and the seconds.
Run under a memory probe, it shows whether the input pipeline's peak memory
grows with the dataset.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd


def stream_epoch(processed: Path, batch_size: int) -> dict:
    """Pull one epoch of training batches over every image in `processed`."""
    from stages.shards import ShardedImages
    from stages.training import make_epochs_dataset

    rows = pd.read_csv(processed / "index.csv", keep_default_na=False)
    images = ShardedImages(processed, rows)
    labels = rows["class_index"].to_numpy(dtype="int32")
    started = time.perf_counter()
    dataset = make_epochs_dataset(images, labels, batch_size, range(1), seed=0)
    count = nbytes = 0
    for batch, _ in dataset:
        count += int(batch.shape[0])
        nbytes += int(batch.numpy().nbytes)
    return {
        "images": count,
        "bytes": nbytes,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    """Stream the epoch and print its counts and seconds as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("project", type=Path, help="project copy with data/processed")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    result = stream_epoch(args.project / "data/processed", args.batch_size)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
