"""Stage download from a table of image paths and labels, and from archives.

Archives are served by a real HTTP server on 127.0.0.1 that the `server`
fixture starts; no test reaches another host.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import logging
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

from stages.cli import InputError
from stages.config import ConfigError, load_params
from stages.datasets import label_folder_name
from stages.download import download
from stages.preprocessing import discover
from tests.conftest import make_image_folder

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


# ---------------------------------------------------------------------------
# HTTP server


@dataclass
class ServerState:
    routes: dict[str, bytes] = field(default_factory=dict)
    # Seconds between bytes for the paths that send their body one byte at a time.
    drips: dict[str, float] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class RouteHandler(http.server.BaseHTTPRequestHandler):
    """Serve `ServerState.routes` and record every requested path."""

    def do_GET(self) -> None:
        state: ServerState = self.server.state
        with state.lock:
            state.requests.append(self.path)
            body = state.routes.get(self.path)
            drip = state.drips.get(self.path, 0.0)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not drip:
            self.wfile.write(body)
            return
        for index in range(len(body)):
            try:
                self.wfile.write(body[index : index + 1])
                self.wfile.flush()
            except OSError:
                return  # the client gave up
            time.sleep(drip)

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Server:
    base_url: str
    state: ServerState

    def add(self, path: str, body: bytes, drip_seconds: float = 0.0) -> str:
        self.state.routes[path] = body
        if drip_seconds:
            self.state.drips[path] = drip_seconds
        return self.base_url + path


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    """A ThreadingHTTPServer on a free port of 127.0.0.1."""
    # A proxy from the environment would send the requests to another host.
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RouteHandler)
    httpd.state = ServerState()
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    host, port = httpd.server_address[:2]
    yield Server(f"http://{host}:{port}", httpd.state)
    httpd.shutdown()
    httpd.server_close()
    thread.join()


# ---------------------------------------------------------------------------
# Data builders


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_files(folder: Path, counts: dict[str, int], prefix: str = "") -> dict:
    """Return generated PNG files as {archive member name: bytes}."""
    make_image_folder(folder, counts)
    return {
        prefix + path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*.png"))
    }


def tgz_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def read_tree(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in folder.rglob("*")
        if path.is_file()
    }


def archive_overrides(url: str, sha256: str, *extra: str) -> list[str]:
    return ["dataset=archive", f"dataset.url={url}", f"dataset.sha256={sha256}", *extra]


# ---------------------------------------------------------------------------
# Table source


def test_download_table_csv_relative_paths(project: Path, tmp_path: Path) -> None:
    make_image_folder(tmp_path / "data" / "images", {"cat": 2, "dog": 1})
    table = tmp_path / "data" / "labels.csv"
    table.write_text(
        "image,label\n"
        "images/cat/000.png,cat\n"
        "images/cat/001.png, cat \n"
        "images/dog/000.png,dog\n"
    )

    counts = download(["dataset=table", f"dataset.path={table}"])

    raw = project / "data/raw"
    assert counts == {"cat": 2, "dog": 1}
    assert sorted(read_tree(raw)) == ["cat/1_000.png", "cat/2_001.png", "dog/3_000.png"]
    source = tmp_path / "data" / "images" / "cat" / "001.png"
    assert (raw / "cat" / "2_001.png").read_bytes() == source.read_bytes()


def test_download_table_parquet_absolute_paths(project: Path, tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "images", {"a": 2, "b": 2})
    paths = sorted(images.rglob("*.png"))
    table = tmp_path / "tables" / "labels.parquet"
    table.parent.mkdir()
    frame = pd.DataFrame({"file": [str(p) for p in paths], "class": [0, 0, 1, 1]})
    frame.to_parquet(table)

    counts = download(
        [
            "dataset=table",
            f"dataset.path={table}",
            "dataset.image_column=file",
            "dataset.label_column=class",
        ]
    )

    assert counts == {"0": 2, "1": 2}
    assert (project / "data/raw/1/4_001.png").read_bytes() == paths[3].read_bytes()


def test_download_table_shared_file_names(project: Path, tmp_path: Path) -> None:
    make_image_folder(tmp_path / "batch1", {"x": 1})
    make_image_folder(tmp_path / "batch2", {"x": 1})
    table = tmp_path / "labels.csv"
    table.write_text("image,label\nbatch1/x/000.png,x\nbatch2/x/000.png,x\n")

    counts = download(["dataset=table", f"dataset.path={table}"])

    assert counts == {"x": 2}
    assert sorted(read_tree(project / "data/raw")) == ["x/1_000.png", "x/2_000.png"]


def test_download_table_unsafe_labels(
    project: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_image_folder(tmp_path / "images", {"one": 5})
    labels = ["a/b", "..", ".hidden", "c\\d", "Thumbs.db"]
    rows = [f"images/one/{i:03d}.png,{label}" for i, label in enumerate(labels)]
    table = tmp_path / "labels.csv"
    table.write_text("image,label\n" + "\n".join(rows) + "\n")

    counts = download(["dataset=table", f"dataset.path={table}"])

    expected = {"a_b", "_..", "_.hidden", "c_d", "_Thumbs.db"}
    assert set(counts) == expected
    assert {p.name for p in (project / "data/raw").iterdir()} == expected
    files, skipped = discover(project / "data/raw")
    assert {f.label for f in files} == expected
    assert skipped == []
    assert "Label 'a/b' is written to folder 'a_b'" in caplog.text


def test_download_table_label_collision(project: Path, tmp_path: Path) -> None:
    make_image_folder(tmp_path / "images", {"one": 2})
    table = tmp_path / "labels.csv"
    table.write_text("image,label\nimages/one/000.png,a/b\nimages/one/001.png,a_b\n")

    with pytest.raises(InputError) as error:
        download(["dataset=table", f"dataset.path={table}"])

    assert "'a/b' and 'a_b'" in str(error.value)
    assert "folder name 'a_b'" in str(error.value)


def test_download_table_missing_column(project: Path, tmp_path: Path) -> None:
    table = tmp_path / "labels.csv"
    table.write_text("path,class\nx.png,a\n")

    with pytest.raises(InputError) as error:
        download(["dataset=table", f"dataset.path={table}"])

    message = str(error.value)
    assert str(table) in message
    assert "no column 'image' (dataset.image_column)" in message
    assert "no column 'label' (dataset.label_column)" in message
    assert "Its columns are: 'path', 'class'" in message


def test_download_table_missing_images(project: Path, tmp_path: Path) -> None:
    make_image_folder(tmp_path / "images", {"cat": 1})
    names = ["images/cat/000.png"] + [f"gone/{i}.png" for i in range(8)]
    table = tmp_path / "labels.csv"
    table.write_text("image,label\n" + "".join(f"{n},cat\n" for n in names))

    with pytest.raises(InputError) as error:
        download(["dataset=table", f"dataset.path={table}"])

    message = str(error.value)
    assert "8 of 9 image files in column 'image' not found" in message
    assert f"{tmp_path / 'gone' / '0.png'} (data row 2)" in message
    assert "gone/5.png" not in message
    assert "and 3 more" in message
    assert not (project / "data/raw").exists()


def test_download_table_empty_label_csv(project: Path, tmp_path: Path) -> None:
    make_image_folder(tmp_path / "images", {"cat": 3})
    table = tmp_path / "labels.csv"
    table.write_text(
        "image,label\nimages/cat/000.png,cat\nimages/cat/001.png,\n"
        "images/cat/002.png,  \n"
    )

    with pytest.raises(InputError) as error:
        download(["dataset=table", f"dataset.path={table}"])

    assert "column 'label' is empty in data rows 2, 3" in str(error.value)


def test_download_table_empty_label_parquet(project: Path, tmp_path: Path) -> None:
    make_image_folder(tmp_path / "images", {"cat": 2})
    table = tmp_path / "labels.parquet"
    pd.DataFrame(
        {"image": ["images/cat/000.png", "images/cat/001.png"], "label": [1.0, None]}
    ).to_parquet(table)

    with pytest.raises(InputError) as error:
        download(["dataset=table", f"dataset.path={table}"])

    assert "column 'label' is empty in data rows 2 " in str(error.value)


def test_download_table_missing_file(project: Path, tmp_path: Path) -> None:
    missing = tmp_path / "absent.csv"

    with pytest.raises(InputError, match=f"dataset.path {missing} not found"):
        download(["dataset=table", f"dataset.path={missing}"])


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("labels.parquet", b"not parquet", "Reading table .*labels.parquet failed"),
        ("labels.csv", b"\xff\xfe\x00broken", "Reading table .*labels.csv failed"),
        ("labels.csv", b"", "Reading table .*labels.csv failed"),
        ("labels.csv", b"image,label\n", "labels.csv has no rows"),
        ("labels.xlsx", b"PK", "unsupported suffix '.xlsx'"),
    ],
)
def test_download_table_unreadable(
    project: Path, tmp_path: Path, name: str, content: bytes, expected: str
) -> None:
    table = tmp_path / name
    table.write_bytes(content)

    with pytest.raises(InputError, match=expected):
        download(["dataset=table", f"dataset.path={table}"])


@pytest.mark.parametrize(
    ("label", "folder"),
    [
        ("cat", "cat"),
        ("dog 🐶", "dog 🐶"),
        ("a/b", "a_b"),
        ("a\\b", "a_b"),
        ("a\0b", "a_b"),
        (".", "_."),
        ("..", "_.."),
        ("desktop.ini", "_desktop.ini"),
    ],
)
def test_label_folder_name(label: str, folder: str) -> None:
    assert label_folder_name(label) == folder


# ---------------------------------------------------------------------------
# Archive source


def test_download_archive_tgz_single_top_folder(
    project: Path, tmp_path: Path, server: Server
) -> None:
    files = image_files(tmp_path / "src", {"daisy": 2, "roses": 3}, "flowers/")
    files["flowers/LICENSE.txt"] = b"licence text"
    data = tgz_bytes(files)
    url = server.add("/flowers.tgz", data)

    counts = download(archive_overrides(url, sha256_of(data)))

    assert counts == {"daisy": 2, "roses": 3}
    tree = read_tree(project / "data/raw")
    assert tree == {
        k.removeprefix("flowers/"): v for k, v in files.items() if k.endswith(".png")
    }
    assert [p.name for p in (project / "data").iterdir()] == ["raw"]


def test_download_archive_zip_root(
    project: Path, tmp_path: Path, server: Server
) -> None:
    files = image_files(tmp_path / "src", {"cat": 2, "dog": 2})
    files[".DS_Store"] = b"\0"
    files["cat/._000.png"] = b"\0"
    files["__MACOSX/cat/._001.png"] = b"\0"
    data = zip_bytes(files)
    url = server.add("/pets.zip", data)

    counts = download(archive_overrides(url, sha256_of(data)))

    assert counts == {"cat": 2, "dog": 2}
    assert sorted(read_tree(project / "data/raw")) == [
        "cat/000.png",
        "cat/001.png",
        "dog/000.png",
        "dog/001.png",
    ]


def test_download_archive_subdir(project: Path, tmp_path: Path, server: Server) -> None:
    files = image_files(tmp_path / "train", {"cat": 2, "dog": 1}, "data/train/")
    files |= image_files(tmp_path / "test", {"cat": 1}, "data/test/")
    data = tgz_bytes(files)
    url = server.add("/pets.tgz", data)

    counts = download(
        archive_overrides(url, sha256_of(data), "dataset.subdir=data/train")
    )

    assert counts == {"cat": 2, "dog": 1}


def test_download_archive_subdir_not_found(
    project: Path, tmp_path: Path, server: Server
) -> None:
    data = tgz_bytes(image_files(tmp_path / "src", {"cat": 1}, "data/train/"))
    url = server.add("/pets.tgz", data)

    with pytest.raises(InputError) as error:
        download(archive_overrides(url, sha256_of(data), "dataset.subdir=data/val"))

    assert "dataset.subdir 'data/val' is not a folder" in str(error.value)
    assert "top-level folders are: data" in str(error.value)


def test_download_archive_without_class_folders(
    project: Path, tmp_path: Path, server: Server
) -> None:
    data = zip_bytes({"a.png": b"x", "b.png": b"y"})
    url = server.add("/flat.zip", data)

    with pytest.raises(InputError, match="has no class folders in its root"):
        download(archive_overrides(url, sha256_of(data)))


def test_download_archive_local_path(project: Path, tmp_path: Path) -> None:
    data = zip_bytes(image_files(tmp_path / "src", {"cat": 1, "dog": 1}))
    archive = tmp_path / "pets.zip"
    archive.write_bytes(data)

    counts = download(archive_overrides(str(archive), sha256_of(data)))

    assert counts == {"cat": 1, "dog": 1}
    assert not (project / ".dvc/tmp/downloads").exists()


def test_download_archive_cached_not_fetched_again(
    project: Path, tmp_path: Path, server: Server
) -> None:
    data = tgz_bytes(image_files(tmp_path / "src", {"cat": 2, "dog": 2}))
    url = server.add("/pets.tgz", data)
    overrides = archive_overrides(url, sha256_of(data))
    download(overrides)

    counts = download(overrides)

    assert counts == {"cat": 2, "dog": 2}
    assert server.state.requests == ["/pets.tgz"]
    assert (project / ".dvc/tmp/downloads/pets.tgz").read_bytes() == data


def test_download_archive_wrong_checksum_keeps_raw(
    project: Path, tmp_path: Path, server: Server
) -> None:
    good = tgz_bytes(image_files(tmp_path / "good", {"cat": 2, "dog": 1}))
    bad = tgz_bytes(image_files(tmp_path / "bad", {"fox": 1}))
    download(archive_overrides(server.add("/good.tgz", good), sha256_of(good)))
    before = read_tree(project / "data/raw")
    url = server.add("/bad.tgz", bad)

    with pytest.raises(InputError) as error:
        download(archive_overrides(url, sha256_of(good)))

    assert sha256_of(bad) in str(error.value)
    assert sha256_of(good) in str(error.value)
    assert read_tree(project / "data/raw") == before
    assert [p.name for p in (project / "data").iterdir()] == ["raw"]


def test_download_archive_unsafe_member(
    project: Path, tmp_path: Path, server: Server
) -> None:
    data = tgz_bytes({"cat/000.png": b"x", "../evil.png": b"y"})
    url = server.add("/evil.tgz", data)

    with pytest.raises(InputError, match="'../evil.png' contains a '..' component"):
        download(archive_overrides(url, sha256_of(data)))

    assert not (project / "data/raw").exists()
    assert not (tmp_path / "evil.png").exists()


def test_download_archive_not_found(project: Path, server: Server) -> None:
    url = server.base_url + "/missing.tgz"

    with pytest.raises(InputError, match="HTTP 404"):
        download(archive_overrides(url, "a" * 64))


def test_download_archive_slow_server_deadline(
    project: Path, tmp_path: Path, server: Server
) -> None:
    data = tgz_bytes(image_files(tmp_path / "src", {"cat": 2, "dog": 2}))
    url = server.add("/pets.tgz", data, drip_seconds=0.05)
    overrides = archive_overrides(
        url,
        sha256_of(data),
        "dataset.max_download_seconds=0.5",
        "dataset.min_download_rate=0",
    )
    started = time.monotonic()

    with pytest.raises(InputError) as error:
        download(overrides)

    message = str(error.value)
    assert time.monotonic() - started < 3.0
    assert f"Download of {url} did not finish" in message
    assert "raise dataset.max_download_seconds" in message
    assert not (project / "data/raw").exists()
    assert (project / ".dvc/tmp/downloads/pets.tgz.part").is_file()


def test_download_unverified_slow_server_rate(
    project: Path, tmp_path: Path, server: Server
) -> None:
    data = tgz_bytes(image_files(tmp_path / "src", {"cat": 2, "dog": 2}))
    url = server.add("/pets.tgz", data, drip_seconds=0.05)
    overrides = [
        "dataset=archive",
        f"dataset.url={url}",
        "dataset.allow_unverified=true",
        "dataset.download_rate_window=0.3",
    ]
    started = time.monotonic()

    with pytest.raises(InputError) as error:
        download(overrides)

    message = str(error.value)
    assert time.monotonic() - started < 3.0
    assert f"Download of {url} is too slow" in message
    assert "below dataset.min_download_rate=1024 bytes per second" in message
    assert list((project / ".dvc/tmp/downloads/unverified").iterdir()) == []


@pytest.mark.parametrize(
    ("userinfo", "secret"),
    [
        ("reader:pa55word", "pa55word"),
        ("ghp_Pa55wordToken", "Pa55word"),
    ],
)
def test_download_archive_url_credentials_rejected(
    project: Path, server: Server, userinfo: str, secret: str
) -> None:
    url = server.add("/pets.tgz", b"never sent")
    with_credentials = url.replace("http://", f"http://{userinfo}@")

    with pytest.raises(ConfigError) as error:
        download(archive_overrides(with_credentials, "a" * 64))

    message = str(error.value)
    assert "dataset.url: contains a user name or password" in message
    assert f"({server.base_url.replace('http://', 'http://***@')}/pets.tgz)" in (
        message
    )
    assert secret not in message
    assert "set dataset.url to the path of the downloaded file" in message
    assert server.state.requests == []


def test_download_archive_url_invalid_port_hidden(project: Path) -> None:
    # A '/' in a password ends the host part early, leaving 'reader:pa' as
    # host and port.
    url = "http://reader:pa/55word@127.0.0.1:9/pets.tgz"

    with pytest.raises(ConfigError) as error:
        load_params(["dataset"], archive_overrides(url, "a" * 64))

    problems = str(error.value).split("\n")[1:]
    assert problems == [
        "  - dataset.url: invalid host part; expected http(s)://HOST[:PORT]/PATH "
        "with a numeric port, or a local path"
    ]


def test_download_archive_cache_inside_raw(project: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="dataset.cache_dir data/raw/cache is inside"):
        download(
            archive_overrides(
                str(tmp_path / "pets.tgz"), "a" * 64, "dataset.cache_dir=data/raw/cache"
            )
        )


def test_download_flowers_unverified_logs_hash(
    project: Path, tmp_path: Path, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    files = image_files(tmp_path / "src", {"daisy": 1, "tulips": 2}, "flower_photos/")
    data = tgz_bytes(files)
    url = server.add("/example_images/flower_photos.tgz", data)
    overrides = [
        "dataset=flowers",
        f"dataset.url={url}",
        "dataset.sha256=null",
        "dataset.allow_unverified=true",
    ]

    counts = download(overrides)

    assert counts == {"daisy": 1, "tulips": 2}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"pin it with dataset.sha256={sha256_of(data)}" in w for w in warnings)
    cached = list((project / ".dvc/tmp/downloads/unverified").iterdir())
    assert [p.name.split("-", 1)[1] for p in cached] == ["flower_photos.tgz"]

    caplog.clear()
    download(overrides)

    assert server.state.requests == ["/example_images/flower_photos.tgz"]
    assert sha256_of(data) in caplog.text


def test_download_unverified_local_archive(
    project: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = zip_bytes(image_files(tmp_path / "src", {"cat": 1, "dog": 1}))
    archive = tmp_path / "pets.zip"
    archive.write_bytes(data)

    counts = download(
        ["dataset=archive", f"dataset.url={archive}", "dataset.allow_unverified=true"]
    )

    assert counts == {"cat": 1, "dog": 1}
    assert f"dataset.sha256={sha256_of(data)}" in caplog.text


# ---------------------------------------------------------------------------
# Config validation


def test_config_flowers_option_valid(project: Path) -> None:
    dataset = load_params(["dataset"], ["dataset=flowers"]).dataset

    assert dataset.source == "archive"
    assert dataset.url.endswith("/example_images/flower_photos.tgz")
    assert dataset.sha256 == (
        "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"
    )
    assert dataset.allow_unverified is False


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["dataset=folder"], "dataset.path: required value is missing"),
        (["dataset=table"], "dataset.path: required value is missing"),
        (
            ["dataset=table", "dataset.path=null"],
            "dataset.path: required when dataset.source is 'table'",
        ),
        (
            ["dataset=table", "dataset.path=t.csv", "dataset.label_column="],
            "dataset.label_column: must name a column",
        ),
        (["dataset=archive"], "dataset.url: required value is missing"),
        (
            ["dataset=archive", "dataset.url=null", "dataset.sha256=" + "a" * 64],
            "dataset.url: required when dataset.source is 'archive'",
        ),
        (
            ["dataset=archive", "dataset.url=pets.tgz"],
            "dataset.sha256: required when dataset.source is 'archive'",
        ),
        (
            ["dataset=archive", "dataset.url=pets.tgz", "dataset.sha256=abc"],
            "dataset.sha256: invalid value 'abc'; expected 64 hexadecimal",
        ),
        (
            ["dataset=flowers", "dataset.sha256=null"],
            "dataset.sha256: required when dataset.source is 'archive'",
        ),
        (
            ["dataset=flowers", "dataset.subdir=../photos"],
            "dataset.subdir: invalid value '../photos'",
        ),
        (
            ["dataset=flowers", "+dataset.path=/data/photos"],
            "dataset.path: not used when dataset.source is 'archive'",
        ),
        (
            ["dataset=folder", "dataset.path=/data", "+dataset.url=pets.tgz"],
            "dataset.url: used only when dataset.source is 'archive'",
        ),
        (["dataset=flowers", "dataset.max_members=0"], "must be at least 1"),
        (
            ["dataset=flowers", "dataset.max_download_seconds=0"],
            "dataset.max_download_seconds: invalid value 0; must be greater than 0",
        ),
        (
            ["dataset=flowers", "dataset.min_download_rate=-1"],
            "dataset.min_download_rate: invalid value -1; must be at least 0",
        ),
        (
            ["dataset=flowers", "dataset.download_rate_window=0"],
            "dataset.download_rate_window: invalid value 0; must be greater than 0",
        ),
        (["dataset.source=tar"], "'digits', 'folder', 'table', 'archive'"),
    ],
)
def test_config_dataset_source_keys(
    project: Path, overrides: list[str], expected: str
) -> None:
    with pytest.raises(ConfigError) as error:
        load_params(["dataset"], overrides)

    assert expected in str(error.value)
