"""Stage download: the built-in digits and a local folder of class folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from stages.cli import InputError
from stages.download import download
from tests.conftest import make_image_folder


def test_download_digits_writes_one_png_per_sample(project: Path) -> None:
    counts = download([])
    raw = project / "data/raw"
    assert sum(counts.values()) == 1797
    assert sorted(counts) == [str(d) for d in range(10)]
    assert sorted(p.name for p in raw.iterdir()) == sorted(counts)
    assert len(list(raw.rglob("*.png"))) == 1797
    expected = np.rint(load_digits().images[0] * 255 / 16).astype(np.uint8)
    with Image.open(raw / "0" / "0000.png") as image:
        assert image.size == (8, 8)
        assert image.mode == "L"
        assert np.array_equal(np.asarray(image), expected)


def test_download_folder_copies_classes(project: Path, tmp_path: Path) -> None:
    source = make_image_folder(tmp_path / "images", {"cat": 3, "dog 🐶": 2})
    (source / ".DS_Store").write_bytes(b"\0")
    (source / "__MACOSX").mkdir()
    (source / "cat" / "._000.png").write_bytes(b"\0")
    counts = download(["dataset=folder", f"dataset.path={source}"])
    assert counts == {"cat": 3, "dog 🐶": 2}
    raw = project / "data/raw"
    assert sorted(p.name for p in raw.iterdir()) == ["cat", "dog 🐶"]
    assert not (raw / "cat" / "._000.png").exists()


def test_download_folder_missing_path(project: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(InputError, match=f"{missing} does not exist"):
        download(["dataset=folder", f"dataset.path={missing}"])


def test_download_folder_without_classes(project: Path, tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"x")
    with pytest.raises(InputError, match="no class sub-folders"):
        download(["dataset=folder", f"dataset.path={tmp_path / 'flat'}"])


def test_download_failure_keeps_previous_output(project: Path, tmp_path: Path) -> None:
    download([])
    with pytest.raises(InputError):
        download(["dataset=folder", f"dataset.path={tmp_path / 'nowhere'}"])
    assert len(list((project / "data/raw").rglob("*.png"))) == 1797
    assert [p.name for p in (project / "data").iterdir()] == ["raw"]


def test_download_folder_skips_unsafe_links(project: Path, tmp_path: Path) -> None:
    source = make_image_folder(tmp_path / "images", {"a": 2, "b": 2})
    (source / "b" / "secret.png").symlink_to("/etc/passwd")
    (source / "b" / "loop").symlink_to("..")
    (source / "b" / "dangling.png").symlink_to(tmp_path / "missing.png")
    (source / "b" / "inside.png").symlink_to(source / "a" / "000.png")
    counts = download(["dataset=folder", f"dataset.path={source}"])
    raw = project / "data/raw"
    assert counts == {"a": 2, "b": 3}
    assert sorted(p.name for p in (raw / "b").iterdir()) == [
        "000.png",
        "001.png",
        "inside.png",
    ]
    assert not (raw / "b" / "inside.png").is_symlink()
