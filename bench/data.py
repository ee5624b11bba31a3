"""Generated photo-like JPEGs in class folders, made once and reused.

Each image is a smooth two-colour gradient with soft blobs of light and a
few small distractor shapes of any kind. One large shape's kind and hue tell
the class. A slight blur and sensor-like noise follow, and the image is saved
as a JPEG of quality 85 to 95. A file is about 40 KiB and needs a full JPEG
decode, as a 500x375 photo does. The tutorial's CNN (bench/reference.py)
reached 69% val accuracy on 800 of these images after 8 epochs, well away
from both chance (25%) and 100%.
"""

from __future__ import annotations

import colorsys
import json
import logging
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
CLASSES = ("ellipse", "rectangle", "triangle", "star")
WIDTH, HEIGHT = 500, 375
# Bump when the drawing changes, so folders made by older code are rebuilt.
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class PhotoSet:
    """A generated folder of class folders and what it holds."""

    path: Path
    num_images: int
    num_classes: int
    mean_file_bytes: float


def _gradient(rng: np.random.Generator) -> np.ndarray:
    """Return a float (HEIGHT, WIDTH, 3) linear gradient between two colours."""
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    ramp = xs * math.cos(angle) + ys * math.sin(angle)
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    start, end = rng.uniform(20, 235, size=(2, 3)).astype(np.float32)
    pixels = start + ramp[..., None] * (end - start)

    # Soft blobs of light and shade, as out-of-focus background detail.
    for _ in range(rng.integers(2, 5)):
        cx, cy = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT)
        radius = rng.uniform(40, 160)
        weight = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * radius**2))
        pixels += weight[..., None] * rng.uniform(-60, 60, size=3).astype(np.float32)
    return pixels


def _shape_points(kind: str, cx: float, cy: float, size: float, turn: float):
    """Return the polygon of a triangle, rectangle or five-pointed star."""
    if kind == "triangle":
        corners, radii = 3, [size]
    elif kind == "rectangle":
        corners, radii = 4, [size]
    else:
        corners, radii = 10, [size, size * 0.45]
    points = []
    for i in range(corners):
        angle = turn + 2 * math.pi * i / corners
        radius = radii[i % len(radii)]
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _colour(hue: float, rng: np.random.Generator) -> tuple[int, int, int]:
    """Return an RGB colour of `hue` (0 to 1) with a random saturation and value."""
    saturation, value = rng.uniform(0.5, 1.0), rng.uniform(0.45, 1.0)
    rgb = colorsys.hsv_to_rgb(hue % 1.0, saturation, value)
    return tuple(int(round(255 * c)) for c in rgb)


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    kind: str,
    size: float,
    colour: tuple[int, int, int],
    rng: np.random.Generator,
) -> None:
    """Draw one filled shape of `kind`, about `size` pixels in radius."""
    cx = rng.uniform(size, WIDTH - size)
    cy = rng.uniform(size, HEIGHT - size)
    if kind == "ellipse":
        rx, ry = size, size * rng.uniform(0.6, 1.0)
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=colour)
        return
    turn = rng.uniform(0, 2 * math.pi)
    draw.polygon(_shape_points(kind, cx, cy, size, turn), fill=colour)


def draw_photo(class_index: int, num_classes: int, seed: int) -> Image.Image:
    """Draw one photo-like RGB image whose large shape is CLASSES[class_index]."""
    rng = np.random.default_rng([seed, class_index])
    image = Image.fromarray(np.clip(_gradient(rng), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(0, 4)):
        kind = CLASSES[rng.integers(len(CLASSES))]
        colour = _colour(rng.uniform(), rng)
        _draw_shape(draw, kind, rng.uniform(12, 30), colour, rng)
    # The class shows in the large shape's kind and in its hue. Each class has
    # its own 1/num_classes of the colour wheel, which distractors share.
    hue = (class_index + rng.uniform(-0.5, 0.5)) / num_classes
    _draw_shape(
        draw, CLASSES[class_index], rng.uniform(60, 120), _colour(hue, rng), rng
    )

    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    noise = rng.normal(0, rng.uniform(3, 8), size=(HEIGHT, WIDTH, 3))
    pixels = np.asarray(image, dtype=np.float32) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_photo(task: tuple[Path, int, int]) -> int:
    """Draw and save photo number i, and return its file size in bytes."""
    folder, i, num_classes = task
    class_index = i % num_classes
    target = folder / CLASSES[class_index] / f"{i // num_classes:05d}.jpg"
    draw_photo(class_index, num_classes, seed=i).save(target, quality=85 + (i * 7) % 11)
    return target.stat().st_size


def _spec(num_images: int, num_classes: int) -> dict:
    return {
        "num_images": num_images,
        "num_classes": num_classes,
        "size": [WIDTH, HEIGHT],
        "generator_version": GENERATOR_VERSION,
    }


def _read_marker(marker: Path) -> dict | None:
    if not marker.is_file():
        return None
    return json.loads(marker.read_text(encoding="utf-8"))


def generate_photos(
    num_images: int, num_classes: int = len(CLASSES), root: Path = DATA_DIR
) -> PhotoSet:
    """Write `num_images` JPEGs, spread evenly over the classes, unless present.

    The folder is root/photos-<num_images>/<class>/<nnnnn>.jpg. A marker file
    next to it (not inside, where it would count as an image) records what was
    made, so a complete folder is reused and an incomplete one is rebuilt.
    """
    if not 2 <= num_classes <= len(CLASSES):
        raise ValueError(
            f"num_classes={num_classes} is out of range; expected 2 to {len(CLASSES)}"
        )
    folder = root / f"photos-{num_images}"
    marker = root / f"photos-{num_images}.json"
    spec = _spec(num_images, num_classes)
    found = _read_marker(marker)
    if found is not None and {k: found.get(k) for k in spec} == spec:
        return PhotoSet(folder, num_images, num_classes, found["mean_file_bytes"])

    log.info(
        "Generating %d photos in %d classes into %s", num_images, num_classes, folder
    )
    marker.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    for name in CLASSES[:num_classes]:
        (folder / name).mkdir(parents=True)
    tasks = [(folder, i, num_classes) for i in range(num_images)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        total_bytes = sum(pool.map(_write_photo, tasks, chunksize=16))
    mean_bytes = total_bytes / num_images
    marker.write_text(json.dumps({**spec, "mean_file_bytes": mean_bytes}), "utf-8")
    return PhotoSet(folder, num_images, num_classes, mean_bytes)


def repeat_photos(photos: PhotoSet, copies: int) -> PhotoSet:
    """Hard-link each class folder of `photos` `copies` times, for a larger set.

    The result is <folder>-x<copies>/<class>/copy<k>/<file>: the same bytes
    under `copies` times as many names, so it takes no extra disk space.
    """
    folder = photos.path.with_name(f"{photos.path.name}-x{copies}")
    marker = folder.with_name(folder.name + ".json")
    spec = {"source": photos.path.name, "copies": copies, **asdict(photos)}
    spec["path"] = str(spec["path"])
    result = PhotoSet(
        folder,
        photos.num_images * copies,
        photos.num_classes,
        photos.mean_file_bytes,
    )
    if _read_marker(marker) == spec:
        return result

    marker.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    for class_dir in sorted(p for p in photos.path.iterdir() if p.is_dir()):
        for k in range(copies):
            target = folder / class_dir.name / f"copy{k:02d}"
            target.mkdir(parents=True)
            for source in sorted(class_dir.iterdir()):
                os.link(source, target / source.name)
    marker.write_text(json.dumps(spec), "utf-8")
    return result
