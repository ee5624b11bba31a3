"""Floating-point work of the CNN, and the machine's matrix-multiply peak.

`cnn_forward_flops` counts a multiply-add as 2 FLOPs and counts only the
convolutions and dense layers. Biases, ReLU, pooling and rescaling would add
about 1.5% for the benchmark's model and are left out. A training step is taken
as 3x the forward FLOPs (forward, gradients of activations, gradients of
weights), the usual estimate.

Run `python -m bench.flops` to print the measured float32 matmul peak as
JSON; it imports TensorFlow, so it runs in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

TRAIN_STEP_FACTOR = 3


@dataclass(frozen=True)
class LayerFlops:
    """Forward FLOPs of one layer for one image."""

    name: str
    output_shape: tuple[int, ...]
    flops: int


def cnn_forward_flops(
    image_size: tuple[int, int],
    channels: int,
    filters: list[int],
    convs_per_block: int,
    kernel_size: int,
    dense_units: list[int],
    num_classes: int,
) -> list[LayerFlops]:
    """Count the forward FLOPs per image of each layer of the project's CNN.

    The layer shapes follow stages/models.py: "same"-padded convolutions,
    and 2x2 max pooling after each block while the feature map is at least
    2 pixels wide in both dimensions. The tutorial's CNN is this model with
    filters [16, 32, 64], one convolution per block and one dense layer of 128.
    """
    height, width = image_size
    depth = channels
    layers = []
    for block, count in enumerate(filters, start=1):
        for conv in range(1, convs_per_block + 1):
            macs = height * width * count * kernel_size * kernel_size * depth
            shape = (height, width, count)
            layers.append(LayerFlops(f"block{block}_conv{conv}", shape, 2 * macs))
            depth = count
        if min(height, width) >= 2:
            height, width = height // 2, width // 2
    units_in = height * width * depth
    for i, units in enumerate([*dense_units, num_classes], start=1):
        name = f"dense{i}" if i <= len(dense_units) else "output"
        layers.append(LayerFlops(name, (units,), 2 * units_in * units))
        units_in = units
    return layers


def matmul_peak(sizes: list[int], repeats: int) -> dict:
    """Time float32 tf.linalg.matmul of square matrices and return the best GFLOP/s.

    Each size runs once untimed (thread pools and kernels warm up), then
    `repeats` timed runs. The result is copied to NumPy, so the time covers
    the whole multiplication.
    """
    import tensorflow as tf

    best: dict[int, float] = {}
    for n in sizes:
        a = tf.random.normal((n, n), dtype=tf.float32)
        b = tf.random.normal((n, n), dtype=tf.float32)
        tf.linalg.matmul(a, b).numpy()
        fastest = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            tf.linalg.matmul(a, b).numpy()
            fastest = min(fastest, time.perf_counter() - started)
        best[n] = 2 * n**3 / fastest / 1e9
    return {
        "peak_gflops": max(best.values()),
        "gflops_by_size": best,
        "repeats": repeats,
        "tensorflow_version": tf.__version__,
    }


def main() -> None:
    """Measure the matmul peak and print it as JSON."""
    parser = argparse.ArgumentParser(description="Measure the float32 matmul peak.")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[2048, 4096],
        help="matrix sizes n of the n x n multiplications",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per size")
    parser.add_argument("--output", help="also write the JSON result to this file")
    args = parser.parse_args()
    result = matmul_peak(args.sizes, args.repeats)
    print(json.dumps(result))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as file:
            json.dump(result, file)


if __name__ == "__main__":
    main()
