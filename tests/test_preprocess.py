"""Stage preprocess: shards, index table, skipped files and metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages.cli import InputError
from stages.download import download
from stages.preprocess import preprocess
from stages.shards import load_images
from tests.conftest import make_image_folder
from tests.services import clean_env


@pytest.fixture
def raw_folder(project: Path, tmp_path: Path) -> Path:
    source = make_image_folder(tmp_path / "images", {"cat": 5, "dog": 4, "ëmu x": 3})
    (source / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (source / "dog" / "notes.txt").write_text("not an image")
    (source / "dog" / ".hidden.png").write_bytes(b"\0")
    download(["dataset=folder", f"dataset.path={source}"])
    return project / "data/raw"


def test_preprocess_writes_shards_and_index(raw_folder: Path, project: Path) -> None:
    metrics = preprocess(["preprocess.shard_size=4", "preprocess.image_size=[6,7]"])
    out = project / "data/processed"
    index = pd.read_csv(out / "index.csv", keep_default_na=False)
    assert metrics == {
        "num_images": 12,
        "num_skipped": 2,
        "num_classes": 3,
        "num_empty_classes": 0,
        "num_small_classes": 0,
    }
    assert json.loads((out / "classes.json").read_text()) == ["cat", "dog", "ëmu x"]
    assert len(list(out.glob("images-*.npy"))) == 3
    assert index["sha256"].str.len().eq(64).all()
    assert set(
        index[["width", "height"]].drop_duplicates().itertuples(index=False)
    ) == {(10, 12)}
    images = load_images(out, index)
    assert images.shape == (12, 6, 7, 1)
    assert images.dtype == np.uint8
    skipped = pd.read_csv(out / "skipped.csv")
    assert sorted(skipped["file"]) == ["cat/broken.png", "dog/notes.txt"]
    saved = json.loads((project / "metrics/preprocess.json").read_text())
    assert saved == metrics


def test_preprocess_rgb_single_worker(raw_folder: Path, project: Path) -> None:
    preprocess(["preprocess.color_mode=rgb", "preprocess.workers=1"])
    index = pd.read_csv(project / "data/processed/index.csv", keep_default_na=False)
    images = load_images(project / "data/processed", index)
    assert images.shape == (12, 16, 16, 3)


def test_preprocess_fail_mode_names_file(raw_folder: Path, project: Path) -> None:
    with pytest.raises(InputError, match="broken.png.*on_error=skip"):
        preprocess(["preprocess.on_error=fail"])
    assert not (project / "data/processed").exists()


def test_preprocess_without_raw(project: Path) -> None:
    with pytest.raises(InputError, match="run the download stage first"):
        preprocess([])


def test_preprocess_digits(digits_project: Path) -> None:
    out = digits_project / "data/processed"
    index = pd.read_csv(out / "index.csv", keep_default_na=False)
    assert len(index) == 1797
    assert index["class_index"].nunique() == 10
    assert load_images(out, index.head(5)).shape == (5, 16, 16, 1)


def test_preprocess_small_and_empty_classes_skip(project: Path, tmp_path: Path) -> None:
    source = make_image_folder(tmp_path / "images", {"big": 5, "bag": 4, "tiny": 2})
    (source / "empty").mkdir()
    (source / "empty" / "junk.txt").write_text("x")
    download(["dataset=folder", f"dataset.path={source}"])
    metrics = preprocess([])
    assert metrics["num_classes"] == 2
    assert metrics["num_empty_classes"] == 1
    assert metrics["num_small_classes"] == 1
    skipped = pd.read_csv(project / "data/processed/skipped.csv")
    tiny = skipped[skipped["file"].str.startswith("tiny/")]
    assert len(tiny) == 2
    assert tiny["reason"].str.contains("min_images_per_class=3").all()
    classes = json.loads((project / "data/processed/classes.json").read_text())
    assert classes == ["bag", "big"]


def test_preprocess_small_class_fails_under_fail(project: Path, tmp_path: Path) -> None:
    source = make_image_folder(tmp_path / "images", {"big": 5, "tiny": 2})
    download(["dataset=folder", f"dataset.path={source}"])
    with pytest.raises(InputError, match="tiny.*min_images_per_class"):
        preprocess(["preprocess.on_error=fail"])
    assert not (project / "data/processed").exists()


def test_shard_writer_caps_shard_bytes(tmp_path: Path, monkeypatch) -> None:
    from stages import shards

    monkeypatch.setattr(shards, "MAX_SHARD_BYTES", 3 * 8 * 8 * 3)
    writer = shards.ShardWriter(tmp_path, shard_size=100)
    addresses = [writer.add(np.full((8, 8, 3), i, np.uint8)) for i in range(7)]
    writer.flush()
    assert addresses[3] == (1, 0)
    assert addresses[6] == (2, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "images-00000.npy",
        "images-00001.npy",
        "images-00002.npy",
    ]
    rows = pd.DataFrame(addresses, columns=["shard", "offset"])
    images = load_images(tmp_path, rows)
    assert [int(image[0, 0, 0]) for image in images] == list(range(7))


def test_preprocess_rejects_single_class(project: Path, tmp_path: Path) -> None:
    source = make_image_folder(tmp_path / "images", {"only": 4})
    (source / "other").mkdir()
    download(["dataset=folder", f"dataset.path={source}"])
    with pytest.raises(InputError, match="one class only"):
        preprocess([])


def test_preprocess_concurrent_run_stopped(project: Path) -> None:
    make_image_folder(project / "data/raw", {"cat": 150, "dog": 150})
    command = [sys.executable, "-m", "stages.preprocess", "preprocess.workers=1"]
    first = subprocess.Popen(
        command,
        cwd=project,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    tmp = project / "data" / f".processed.tmp-{first.pid}"
    deadline = time.monotonic() + 60
    try:
        # Pause the first run while it writes, so the second starts mid-write.
        while not tmp.exists():
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first run never wrote"
            time.sleep(0.002)
        os.kill(first.pid, signal.SIGSTOP)
        second = subprocess.run(
            command, cwd=project, env=clean_env(), capture_output=True, text=True
        )
        tmp_kept = tmp.is_dir()
    finally:
        os.kill(first.pid, signal.SIGCONT)
    first_errors = first.communicate(timeout=60)[1]

    assert second.returncode == 1, second.stderr
    assert f"data/processed is being written by process {first.pid}" in second.stderr
    assert "holds the lock data/.processed.lock" in second.stderr
    assert "Traceback" not in second.stderr
    assert tmp_kept
    assert first.returncode == 0, first_errors
    index = pd.read_csv(project / "data/processed/index.csv")
    assert len(index) == 300
    assert not tmp.exists()
    assert not (project / "data/.processed.lock").exists()
