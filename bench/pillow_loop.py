"""Baseline decoder, a single-process Pillow loop that decodes and resizes.

`python -m bench.pillow_loop FOLDER --size 128 128` reads every file under
FOLDER, converts it to RGB, resizes it with bilinear filtering and prints
one JSON object: the image count and the seconds the loop took. `--draft`
lets libjpeg decode at a reduced scale first (Image.draft), which Pillow
allows down to the smallest scale that is still at least the target size.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image


def decode_folder(folder: Path, size: tuple[int, int], draft: bool = False) -> int:
    """Decode and resize every file under `folder` to `size` (height, width)."""
    height, width = size
    count = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with Image.open(path) as image:
            if draft:
                image.draft("RGB", (width, height))
            resized = image.convert("RGB").resize(
                (width, height), Image.Resampling.BILINEAR
            )
            pixels = np.asarray(resized, dtype=np.uint8)
        if pixels.shape != (height, width, 3):
            raise ValueError(f"{path}: decoded to {pixels.shape}, expected {size}x3")
        count += 1
    return count


def main() -> None:
    """Decode the folder and print the count and seconds as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "folder", type=Path, help="folder of images, searched recursively"
    )
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=(128, 128),
        metavar=("HEIGHT", "WIDTH"),
        help="output size in pixels",
    )
    parser.add_argument("--draft", action="store_true", help="use JPEG draft mode")
    args = parser.parse_args()
    started = time.perf_counter()
    count = decode_folder(args.folder, tuple(args.size), args.draft)
    print(json.dumps({"images": count, "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
