"""Stage preprocess: decode data/raw/ into fixed-shape uint8 shards.

Reads params: preprocess. Reads: data/raw/. Writes: data/processed/ (shards,
index.csv with file, label, sha256 and original size per image, classes.json,
skipped.csv) and metrics/preprocess.json.
"""

from __future__ import annotations

import logging
from pathlib import Path

from stages.cli import InputError, run_stage
from stages.config import PreprocessConfig, load_params
from stages.fsutil import atomic_dir, write_json
from stages.images import DecodeSettings, ImageError
from stages.preprocessing import (
    class_problems,
    drop_small_classes,
    preprocess_folder,
    summarise_skipped,
)

log = logging.getLogger("stages.preprocess")

RAW_DIR = Path("data/raw")
PROCESSED_DIR = Path("data/processed")
METRICS_FILE = Path("metrics/preprocess.json")


def decode_settings(cfg: PreprocessConfig) -> DecodeSettings:
    """Build the decoder settings from the preprocess section."""
    height, width = cfg.image_size
    return DecodeSettings(
        height=height,
        width=width,
        color_mode=cfg.color_mode,
        resize=cfg.resize,
        background=tuple(cfg.background),
        max_pixels=cfg.max_pixels,
    )


def _check_classes(raw_dir, index, skipped, cfg: PreprocessConfig):
    """Report empty and small classes; drop small ones, or raise under on_error=fail."""
    empty, small = class_problems(raw_dir, index, cfg.min_images_per_class)
    if empty:
        log.warning("Class folders without a usable image: %s", ", ".join(empty))
    if small:
        log.warning(
            "Classes with fewer than %d images: %s",
            cfg.min_images_per_class,
            ", ".join(small),
        )
    if cfg.on_error == "fail" and (empty or small):
        raise InputError(
            f"Classes without enough usable images under {raw_dir}: "
            f"{', '.join(empty + small)}; add images, lower "
            "preprocess.min_images_per_class, or set preprocess.on_error=skip to "
            "leave them out"
        )
    index, skipped = drop_small_classes(index, skipped, small, cfg.min_images_per_class)
    problems = {"num_empty_classes": len(empty), "num_small_classes": len(small)}
    return index, skipped, problems


def preprocess(
    overrides: list[str],
    raw_dir: Path = RAW_DIR,
    output: Path = PROCESSED_DIR,
    metrics_file: Path = METRICS_FILE,
) -> dict[str, int]:
    """Decode every image of `raw_dir` and return the counts written to metrics."""
    cfg = load_params(["preprocess"], overrides).preprocess
    if not raw_dir.is_dir():
        raise InputError(f"{raw_dir} not found; run the download stage first")
    settings = decode_settings(cfg)
    log.info(
        "Decoding to %dx%d %s, resize=%s",
        settings.height,
        settings.width,
        cfg.color_mode,
        cfg.resize,
    )
    with atomic_dir(output) as tmp:
        try:
            index, skipped = preprocess_folder(
                raw_dir,
                tmp,
                settings,
                cfg.shard_size,
                cfg.workers,
                fail_on_error=cfg.on_error == "fail",
            )
        except ImageError as error:
            raise InputError(
                f"{error}; remove or fix the file, or set preprocess.on_error=skip"
            ) from None
        index, skipped, problems = _check_classes(raw_dir, index, skipped, cfg)
        if index.empty:
            raise InputError(f"No usable image found under {raw_dir}")
        classes = sorted(index["label"].unique())
        if len(classes) < 2:
            raise InputError(
                f"Found images of one class only ({classes[0]!r}) under {raw_dir}; "
                "a classifier needs at least 2 class folders"
            )
        index.to_csv(tmp / "index.csv", index=False)
        skipped.to_csv(tmp / "skipped.csv", index=False)
        write_json(tmp / "classes.json", classes)

    per_class = index["label"].value_counts().reindex(classes).to_dict()
    log.info(
        "Wrote %d images in %d classes to %s; per class: %s",
        len(index),
        len(classes),
        output,
        per_class,
    )
    if len(skipped):
        log.warning(
            "%s (full list in %s)", summarise_skipped(skipped), output / "skipped.csv"
        )
    metrics = {
        "num_images": len(index),
        "num_skipped": len(skipped),
        "num_classes": len(classes),
        **problems,
    }
    write_json(metrics_file, metrics)
    return metrics


if __name__ == "__main__":
    run_stage(preprocess, __doc__)
