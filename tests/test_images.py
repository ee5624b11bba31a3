"""Image decoding: formats, colour modes, orientation, size limits, bad files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.images import DecodeSettings, ImageError, decode_image, is_ignored

RGB = DecodeSettings(8, 8, "rgb", "stretch", (255, 255, 255), 10_000)
GRAY = DecodeSettings(8, 8, "grayscale", "stretch", (255, 255, 255), 10_000)


def save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF"])
def test_decode_common_formats(tmp_path: Path, fmt: str) -> None:
    image = Image.new("RGB", (20, 10), (200, 30, 30))
    path = save(image, tmp_path / f"red.{fmt.lower()}", format=fmt)
    decoded = decode_image(path, RGB)
    assert decoded.pixels.shape == (8, 8, 3)
    assert decoded.pixels.dtype == np.uint8
    assert decoded.format == fmt
    assert (decoded.original_width, decoded.original_height) == (20, 10)
    assert decoded.pixels[..., 0].mean() > 150


def test_decode_detects_format_by_content(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (8, 8), "blue"), tmp_path / "photo.jpg", format="PNG")
    assert decode_image(path, RGB).format == "PNG"


def test_decode_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ("white", "black")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert decode_image(path, GRAY).pixels.mean() > 250


def test_decode_applies_exif_orientation(tmp_path: Path) -> None:
    image = Image.new("L", (16, 8), 0)
    image.paste(255, (0, 0, 8, 8))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    path = save(image, tmp_path / "rotated.jpg", exif=exif, quality=95)
    settings = DecodeSettings(16, 8, "grayscale", "stretch", (255, 255, 255), 10_000)
    pixels = decode_image(path, settings).pixels[..., 0]
    assert pixels.shape == (16, 8)
    assert pixels[:8].mean() > 200  # the white half is now on top
    assert pixels[8:].mean() < 50


def test_decode_16bit_scaled_not_clamped(tmp_path: Path) -> None:
    values = np.full((8, 8), 32768, dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / "deep.png")
    pixels = decode_image(path, GRAY).pixels
    assert 126 <= pixels.mean() <= 129


def test_decode_float_image(tmp_path: Path) -> None:
    values = np.full((8, 8), 0.5, dtype=np.float32)
    path = save(Image.fromarray(values, mode="F"), tmp_path / "float.tiff")
    assert 126 <= decode_image(path, GRAY).pixels.mean() <= 129


def test_decode_rgba_on_background(tmp_path: Path) -> None:
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    path = save(image, tmp_path / "clear.png")
    settings = DecodeSettings(8, 8, "rgb", "stretch", (0, 255, 0), 10_000)
    assert decode_image(path, settings).pixels[0, 0].tolist() == [0, 255, 0]


def test_decode_palette_with_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    path = save(image, tmp_path / "palette.png", transparency=0)
    assert decode_image(path, RGB).pixels[0, 0].tolist() == [255, 255, 255]


def test_decode_cmyk_and_grayscale(tmp_path: Path) -> None:
    cmyk = save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg")
    assert decode_image(cmyk, RGB).pixels[..., 0].mean() > 200
    gray = save(Image.new("L", (8, 8), 100), tmp_path / "g.png")
    assert decode_image(gray, RGB).pixels.shape == (8, 8, 3)


@pytest.mark.parametrize("policy", ["stretch", "pad", "crop"])
def test_decode_resize_policies(tmp_path: Path, policy: str) -> None:
    image = Image.new("L", (40, 10), 0)
    path = save(image, tmp_path / "wide.png")
    settings = DecodeSettings(8, 8, "grayscale", policy, (255, 255, 255), 10_000)
    pixels = decode_image(path, settings).pixels[..., 0]
    assert pixels.shape == (8, 8)
    padded_rows = (pixels == 255).all(axis=1).sum()
    assert (padded_rows > 0) == (policy == "pad")


def test_decode_rejects_too_many_pixels_before_decoding(tmp_path: Path) -> None:
    path = save(Image.new("L", (200, 200)), tmp_path / "big.png")
    truncated = tmp_path / "big_truncated.png"
    truncated.write_bytes(path.read_bytes()[:100])  # header only
    with pytest.raises(ImageError, match="exceeds preprocess.max_pixels"):
        decode_image(truncated, GRAY)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"hello, world", "not an image"), (b"", "not an image")],
)
def test_decode_rejects_non_images(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "notes.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason):
        decode_image(path, GRAY)


def test_decode_rejects_truncated_file(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    settings = DecodeSettings(8, 8, "rgb", "stretch", (255, 255, 255), 100_000)
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode_image(path, settings)


@pytest.mark.parametrize(
    ("name", "ignored"),
    [
        (".DS_Store", True),
        ("Thumbs.db", True),
        ("__MACOSX", True),
        (".hidden", True),
        ("cat.png", False),
        ("dög 1.jpg", False),
    ],
)
def test_is_ignored(name: str, ignored: bool) -> None:
    assert is_ignored(name) is ignored


def test_decode_large_jpeg_reduced_decode_close(tmp_path: Path) -> None:
    y, x = np.mgrid[0:300, 0:400]
    photo = np.stack([x * 255 // 400, y * 255 // 300, (x + y) % 256], axis=-1)
    path = save(Image.fromarray(photo.astype(np.uint8)), tmp_path / "p.jpg", quality=95)
    settings = DecodeSettings(32, 32, "rgb", "stretch", (255, 255, 255), 10**6)
    decoded = decode_image(path, settings)
    with Image.open(path) as full:
        expected = np.asarray(full.convert("RGB").resize((32, 32), Image.BILINEAR))
    difference = np.abs(decoded.pixels.astype(int) - expected.astype(int))
    assert decoded.pixels.shape == (32, 32, 3)
    assert (decoded.original_width, decoded.original_height) == (400, 300)
    assert difference.mean() < 8
