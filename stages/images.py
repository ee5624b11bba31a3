"""Image decoding: any common file in, one uint8 array of a fixed shape out.

The format is detected from the content, not the extension. EXIF orientation
is applied (TensorFlow's decoders ignore it), transparency is laid on a
background colour, and 16-bit and floating-point images are scaled to 8 bits
rather than clamped as Pillow's own conversion does.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# decode_image checks the pixel count against preprocess.max_pixels itself,
# so Pillow's fixed limit would only get in the way of a larger setting.
Image.MAX_IMAGE_PIXELS = None

# Files and folders that operating systems and archivers add next to images.
SYSTEM_NAMES = {"thumbs.db", "desktop.ini", "__macosx", "$recycle.bin", "icon\r"}


def is_ignored(name: str) -> bool:
    """Tell whether a file or folder name is hidden or belongs to the system."""
    return name.startswith(".") or name.lower() in SYSTEM_NAMES


class ImageError(ValueError):
    """An image file cannot be used; the message is the reason."""


@dataclass(frozen=True)
class DecodeSettings:
    """Settings that bring every image to one shape and colour mode."""

    height: int
    width: int
    color_mode: str  # "grayscale" or "rgb"
    resize: str  # "stretch", "pad" or "crop"
    background: tuple[int, int, int]
    max_pixels: int

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "grayscale" else 3


@dataclass(frozen=True)
class DecodedImage:
    """Pixels of one image with facts about its source file."""

    pixels: np.ndarray  # (height, width, channels) uint8
    sha256: str
    original_width: int
    original_height: int
    original_mode: str
    format: str


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer and float images into 0..255."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max(initial=0) <= 65535 else values.max()
        scaled = np.clip(values, 0, None) * (255.0 / top)
        return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        # NOTE: floats are read as 0..1 when they fit there, else as 0..255.
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
        scaled = np.clip(values * scale, 0, 255)
        return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")
    return image


def _flatten(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Convert to RGB or L, laying any transparency on `background`."""
    image = _to_8bit(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode in ("L", "RGB"):
        return image
    if image.mode == "1":
        return image.convert("L")
    return image.convert("RGB")


def _resize(image: Image.Image, settings: DecodeSettings) -> Image.Image:
    size = (settings.width, settings.height)
    if image.size == size:
        return image
    if settings.resize == "pad":
        fill = settings.background if image.mode == "RGB" else settings.background[0]
        return ImageOps.pad(image, size, Image.Resampling.BILINEAR, color=fill)
    if settings.resize == "crop":
        return ImageOps.fit(image, size, Image.Resampling.BILINEAR)
    return image.resize(size, Image.Resampling.BILINEAR)


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("not an image or an unsupported format") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"corrupt or truncated image ({error})") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageError(
            f"{width}x{height} pixels exceeds preprocess.max_pixels={max_pixels}"
        )
    return image


def _request_reduced_decode(image: Image.Image, settings: DecodeSettings) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale when that still covers the target.

    The decoder then skips most of the work for large photos; the final
    resize to the target size follows as usual. The longer target side is
    requested on both axes, so an EXIF rotation cannot make the result small.
    """
    if image.format != "JPEG":
        return
    side = max(settings.height, settings.width)
    if min(image.size) >= 2 * side:
        image.draft(image.mode, (side, side))


def decode_image(path: Path, settings: DecodeSettings) -> DecodedImage:
    """Decode one file into an array of the configured shape and mode.

    Raises:
        ImageError: the file is not a readable image or is too large; the
            pixel count is checked from the header, before decoding.
    """
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    image = _open_checked(data, settings.max_pixels)
    original = (image.width, image.height, image.mode, image.format or "")
    try:
        image.seek(0)  # first frame of an animation
        _request_reduced_decode(image, settings)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        image = _flatten(image, settings.background)
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"corrupt or truncated image ({error})") from None
    target_mode = "L" if settings.color_mode == "grayscale" else "RGB"
    if image.mode != target_mode:
        image = image.convert(target_mode)
    pixels = np.asarray(_resize(image, settings), dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    return DecodedImage(pixels, sha256, *original)
