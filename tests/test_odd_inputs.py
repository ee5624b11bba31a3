"""One folder with every awkward input a user's photos bring, through the
download and preprocess stages, with the expected outcome of each file."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stages.download import download
from stages.preprocess import preprocess


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def write_odd_folder(root: Path) -> dict[str, str | None]:
    """Write the odd inputs and return each file's expected skip reason (None: kept)."""
    cats, dogs = root / "cats", root / "dög photos"
    cats.mkdir(parents=True)
    dogs.mkdir()
    rgb = Image.new("RGB", (30, 20), (200, 40, 40))
    for fmt in ("PNG", "GIF", "BMP", "WEBP", "TIFF"):
        rgb.save(cats / f"cat.{fmt.lower()}", format=fmt)
    (cats / "cat.jpg").write_bytes(jpeg_bytes(rgb))
    rgb.save(cats / "really_png.jpg", format="PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    (cats / "rotated.jpg").write_bytes(jpeg_bytes(rgb, exif=exif))
    Image.new("L", (9, 9), 90).save(dogs / "gray.png")
    palette = Image.new("P", (9, 9), 1)
    palette.save(dogs / "palette.png")
    palette.save(dogs / "palette_transparent.png", transparency=0)
    Image.new("RGBA", (9, 9), (0, 0, 0, 0)).save(dogs / "rgba.png")
    Image.new("CMYK", (9, 9), (0, 0, 0, 0)).save(dogs / "cmyk.jpg")
    Image.fromarray(np.full((9, 9), 40000, dtype=np.uint16)).save(dogs / "deep.png")
    Image.fromarray(np.full((9, 9), 0.25, dtype=np.float32), "F").save(dogs / "f.tiff")
    Image.new("L", (9, 9), 10).save(dogs / "name with spaces ünïcode.png")
    (dogs / "truncated.jpg").write_bytes(jpeg_bytes(rgb)[:200])
    (dogs / "notes.txt").write_text("not an image")
    Image.new("L", (4000, 4000)).save(dogs / "huge.png")
    (root / ".DS_Store").write_bytes(b"\0\0")
    (dogs / "Thumbs.db").write_bytes(b"\0")
    (dogs / ".hidden.png").write_bytes(b"\0")
    (root / "__MACOSX" / "cats").mkdir(parents=True)
    (root / "__MACOSX" / "cats" / "._cat.png").write_bytes(b"\0")
    (root / ".git").mkdir()
    (root / "loose.png").write_bytes((cats / "cat.png").read_bytes())
    expected: dict[str, str | None] = {
        f"cats/{p.name}": None for p in cats.iterdir()
    } | {f"dög photos/{p.name}": None for p in dogs.iterdir() if p.name[0] != "."}
    expected.pop("dög photos/Thumbs.db")
    expected["dög photos/truncated.jpg"] = "corrupt or truncated"
    expected["dög photos/notes.txt"] = "not an image"
    expected["dög photos/huge.png"] = "exceeds preprocess.max_pixels"
    return expected


@pytest.fixture
def odd_result(project: Path, tmp_path: Path):
    expected = write_odd_folder(tmp_path / "photos")
    download(["dataset=folder", f"dataset.path={tmp_path / 'photos'}"])
    metrics = preprocess(
        [
            "preprocess.color_mode=rgb",
            "preprocess.max_pixels=1000000",
            "preprocess.workers=2",
        ]
    )
    out = project / "data/processed"
    index = pd.read_csv(out / "index.csv", keep_default_na=False)
    skipped = pd.read_csv(out / "skipped.csv", keep_default_na=False)
    return expected, metrics, index, skipped, out


def test_odd_inputs_each_file_outcome(odd_result) -> None:
    expected, metrics, index, skipped, out = odd_result
    kept = {name for name, reason in expected.items() if reason is None}
    assert set(index["file"]) == kept
    reasons = dict(zip(skipped["file"], skipped["reason"], strict=True))
    assert "loose.png" not in reasons  # download copies class folders only
    assert set(reasons) == {n for n, r in expected.items() if r is not None}
    for name, reason in reasons.items():
        assert expected[name] in reason, (name, reason)
    assert json.loads((out / "classes.json").read_text()) == ["cats", "dög photos"]
    assert metrics["num_skipped"] == 3


def test_odd_inputs_pixels(odd_result) -> None:
    _, _, index, _, out = odd_result
    from stages.shards import load_images

    def pixels(name: str) -> np.ndarray:
        return load_images(out, index[index["file"] == name])[0]

    assert index.set_index("file").loc["cats/really_png.jpg", "format"] == "PNG"
    assert index.set_index("file").loc["cats/cat.gif", "format"] == "GIF"
    assert pixels("dög photos/rgba.png").min() == 255  # laid on white
    assert 150 <= pixels("dög photos/deep.png").mean() <= 160  # 40000/65535 * 255
    assert 60 <= pixels("dög photos/f.tiff").mean() <= 68  # 0.25 * 255
    assert index.set_index("file").loc["cats/rotated.jpg", "width"] == 30
