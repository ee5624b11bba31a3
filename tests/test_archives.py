"""Tests of stages.archives against a real HTTP server on 127.0.0.1.

The server serves archives generated under tmp_path and can drop connections,
return HTTP 500, stall, send one byte at a time, or ignore Range requests, so
retries, resumes and download limits run over real sockets.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import re
import stat
import struct
import tarfile
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stages.archives import (
    ArchiveError,
    DownloadLimits,
    DownloadTooSlowError,
    extract,
    fetch,
)

BACKOFF = 0.01
FILES = {
    "cats/cat_0.png": os.urandom(3000),
    "cats/cat_1.png": os.urandom(2000),
    "dogs/dog_0.png": os.urandom(1000),
    "README.txt": b"two classes\n",
}
TAR_MODES = {"tar": "w", "tar.gz": "w:gz", "tar.bz2": "w:bz2", "tar.xz": "w:xz"}
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


# ---------------------------------------------------------------------------
# HTTP server


@dataclass
class Route:
    """What the server sends for one path, with counters of faults still to inject."""

    body: bytes
    ranges: bool = True
    drop_after: int = 0
    num_drops: int = 0
    num_failures: int = 0
    stall_seconds: float = 0.0
    num_stalls: int = 0
    drip_seconds: float = 0.0  # > 0: send the body one byte per interval


@dataclass
class ServerState:
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class ArchiveHandler(http.server.BaseHTTPRequestHandler):
    """Serve `ServerState.routes` over HTTP/1.0, so each response closes its socket."""

    def do_GET(self) -> None:
        state: ServerState = self.server.state
        range_header = self.headers.get("Range")
        with state.lock:
            state.requests.append((self.path, range_header))
            route = state.routes.get(self.path)
            fault = _take_fault(route)
        if route is None:
            self.send_error(404)
            return
        if fault == "failure":
            self.send_error(500)
            return
        if fault == "stall":
            time.sleep(route.stall_seconds)
        self._send_body(route, range_header, drop=fault == "drop")

    def _send_body(self, route: Route, range_header: str | None, drop: bool) -> None:
        size = len(route.body)
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        start = int(match.group(1)) if match and route.ranges else 0
        if start >= size > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return

        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        body = route.body[start:]
        if route.drip_seconds:
            self._drip(body, route.drip_seconds)
            return
        self.wfile.write(body[: route.drop_after] if drop else body)

    def _drip(self, body: bytes, interval: float) -> None:
        """Send `body` one byte per `interval` until done or the client leaves."""
        for index in range(len(body)):
            try:
                self.wfile.write(body[index : index + 1])
                self.wfile.flush()
            except OSError:
                return
            time.sleep(interval)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _take_fault(route: Route | None) -> str | None:
    if route is None:
        return None
    if route.num_failures:
        route.num_failures -= 1
        return "failure"
    if route.num_drops:
        route.num_drops -= 1
        return "drop"
    if route.num_stalls:
        route.num_stalls -= 1
        return "stall"
    return None


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # A stalled handler writes to a socket that the client has closed.
        pass


@dataclass
class Server:
    base_url: str
    state: ServerState

    def add(self, path: str, body: bytes, **faults: int | float | bool) -> str:
        self.state.routes[path] = Route(body, **faults)
        return self.base_url + path

    def ranges_for(self, path: str) -> list[str | None]:
        return [
            header for requested, header in self.state.requests if requested == path
        ]


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    # A proxy from the environment would send the requests to another host.
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    httpd = QuietServer(("127.0.0.1", 0), ArchiveHandler)
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
# Archive builders


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    path.write_bytes(zip_bytes(files))
    return path


def write_zip_members(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """Write a zip of `(name, data)` members, where names may repeat."""
    with zipfile.ZipFile(path, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile's "Duplicate name"
        for name, data in members:
            archive.writestr(name, data)
    return path


def write_tar(
    path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w"
) -> Path:
    """Write a tar of `(name, data)` files and prepared TarInfo headers."""
    with tarfile.open(path, mode) as archive:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                archive.addfile(member)
                continue
            name, data = member
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def tar_header(name: str, member_type: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = member_type
    info.linkname = linkname
    return info


def zip_symlink(path: Path, name: str, link: str) -> Path:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix, so the high bits of external_attr are a mode
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(info, link)
    return path


def zip_with_understated_size(path: Path, name: str, declared: int) -> Path:
    """Write a zip whose headers declare `declared` bytes for 200 kB of data."""
    data = bytearray(zip_bytes({name: bytes(200_000)}))
    # Uncompressed size sits at byte 22 of the local header and byte 24 of
    # the central directory header (APPNOTE.TXT, sections 4.3.7 and 4.3.12).
    struct.pack_into("<I", data, 22, declared)
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, declared)
    path.write_bytes(bytes(data))
    return path


def write_archive(path: Path, archive_format: str, files: dict[str, bytes]) -> Path:
    if archive_format == "zip":
        return write_zip(path, files)
    return write_tar(path, list(files.items()), TAR_MODES[archive_format])


def read_tree(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in folder.rglob("*")
        if path.is_file()
    }


def temp_dirs(target: Path) -> list[Path]:
    return list(target.parent.glob(f".{target.name}.partial-*"))


@pytest.fixture
def archive_data() -> bytes:
    """Return a zip of random bytes, large enough for several network chunks."""
    return zip_bytes({"images/noise.bin": os.urandom(200_000)})


# ---------------------------------------------------------------------------
# fetch


def test_fetch_good_download_verified(
    server: Server, archive_data: bytes, tmp_path: Path
) -> None:
    url = server.add("/datasets/shapes.zip", archive_data)

    path = fetch(url, sha256_of(archive_data), tmp_path / "cache", backoff=BACKOFF)

    assert path == tmp_path / "cache" / "shapes.zip"
    assert path.read_bytes() == archive_data
    assert not (tmp_path / "cache" / "shapes.zip.part").exists()


def test_fetch_wrong_checksum_raises(
    server: Server, archive_data: bytes, tmp_path: Path
) -> None:
    url = server.add("/shapes.zip", archive_data)
    expected = "0" * 64
    cache_dir = tmp_path / "cache"

    with pytest.raises(ArchiveError) as error:
        fetch(url, expected, cache_dir, backoff=BACKOFF)

    assert expected in str(error.value)
    assert sha256_of(archive_data) in str(error.value)
    assert list(cache_dir.iterdir()) == []


def test_fetch_dropped_connection_resumes(
    server: Server, archive_data: bytes, tmp_path: Path
) -> None:
    url = server.add("/shapes.zip", archive_data, drop_after=50_000, num_drops=2)

    path = fetch(url, sha256_of(archive_data), tmp_path, backoff=BACKOFF)

    assert path.read_bytes() == archive_data
    assert server.ranges_for("/shapes.zip") == [
        None,
        "bytes=50000-",
        "bytes=100000-",
    ]


def test_fetch_ignored_range_restarts(
    server: Server, archive_data: bytes, tmp_path: Path
) -> None:
    url = server.add("/shapes.zip", archive_data, ranges=False)
    (tmp_path / "shapes.zip.part").write_bytes(b"stale bytes")

    path = fetch(url, sha256_of(archive_data), tmp_path, backoff=BACKOFF)

    assert path.read_bytes() == archive_data
    assert server.ranges_for("/shapes.zip") == ["bytes=11-"]


def test_fetch_complete_part_renamed(
    server: Server, archive_data: bytes, tmp_path: Path
) -> None:
    url = server.add("/shapes.zip", archive_data)
    (tmp_path / "shapes.zip.part").write_bytes(archive_data)

    path = fetch(url, sha256_of(archive_data), tmp_path, backoff=BACKOFF)

    assert path.read_bytes() == archive_data
    assert server.ranges_for("/shapes.zip") == [f"bytes={len(archive_data)}-"]


def test_fetch_server_error_retried(
    server: Server, archive_data: bytes, tmp_path: Path
) -> None:
    url = server.add("/shapes.zip", archive_data, num_failures=3)

    path = fetch(url, sha256_of(archive_data), tmp_path, retries=4, backoff=BACKOFF)

    assert path.read_bytes() == archive_data
    assert len(server.ranges_for("/shapes.zip")) == 4


def test_fetch_server_error_exhausts_retries(
    server: Server, archive_data: bytes, tmp_path: Path
) -> None:
    url = server.add("/shapes.zip", archive_data, num_failures=10)

    with pytest.raises(ArchiveError) as error:
        fetch(url, sha256_of(archive_data), tmp_path, retries=2, backoff=BACKOFF)

    assert url in str(error.value)
    assert "HTTP 500" in str(error.value)
    assert len(server.ranges_for("/shapes.zip")) == 3


def test_fetch_timeout_retried(
    server: Server, archive_data: bytes, tmp_path: Path
) -> None:
    url = server.add("/shapes.zip", archive_data, stall_seconds=0.5, num_stalls=1)

    path = fetch(url, sha256_of(archive_data), tmp_path, timeout=0.2, backoff=BACKOFF)

    assert path.read_bytes() == archive_data
    assert len(server.ranges_for("/shapes.zip")) == 2


def test_fetch_slow_drip_passes_deadline(
    server: Server, archive_data: bytes, tmp_path: Path
) -> None:
    url = server.add("/shapes.zip", archive_data, drip_seconds=0.05)
    limits = DownloadLimits(max_seconds=0.5, min_rate=0)
    started = time.monotonic()

    with pytest.raises(DownloadTooSlowError) as error:
        fetch(url, sha256_of(archive_data), tmp_path, backoff=BACKOFF, limits=limits)

    message = str(error.value)
    assert time.monotonic() - started < 2.0
    assert url in message
    assert "dataset.max_download_seconds=0.5 seconds" in message
    assert str(tmp_path / "shapes.zip.part") in message
    assert (tmp_path / "shapes.zip.part").stat().st_size > 0
    assert len(server.ranges_for("/shapes.zip")) == 1


def test_fetch_slow_drip_below_min_rate(
    server: Server, archive_data: bytes, tmp_path: Path
) -> None:
    url = server.add("/shapes.zip", archive_data, drip_seconds=0.05)
    limits = DownloadLimits(min_rate=1000, rate_window=0.3)
    started = time.monotonic()

    with pytest.raises(DownloadTooSlowError) as error:
        fetch(url, sha256_of(archive_data), tmp_path, backoff=BACKOFF, limits=limits)

    message = str(error.value)
    assert time.monotonic() - started < 2.0
    assert url in message
    assert "below dataset.min_download_rate=1000 bytes per second" in message
    assert "dataset.download_rate_window" in message
    assert len(server.ranges_for("/shapes.zip")) == 1


def test_fetch_deadline_cuts_retry_waits(
    server: Server, archive_data: bytes, tmp_path: Path
) -> None:
    url = server.add("/shapes.zip", archive_data, num_failures=10)
    limits = DownloadLimits(max_seconds=0.5)
    started = time.monotonic()

    with pytest.raises(DownloadTooSlowError) as error:
        fetch(url, sha256_of(archive_data), tmp_path, backoff=1.0, limits=limits)

    assert time.monotonic() - started < 1.0
    assert "HTTP 500" in str(error.value)
    assert "dataset.max_download_seconds=0.5" in str(error.value)
    assert len(server.ranges_for("/shapes.zip")) == 1


def test_fetch_limit_error_masks_token(
    server: Server, archive_data: bytes, tmp_path: Path
) -> None:
    url = server.add("/shapes.zip?token=s3cret-value", archive_data, drip_seconds=0.05)
    limits = DownloadLimits(max_seconds=0.3, min_rate=0)

    with pytest.raises(DownloadTooSlowError) as error:
        fetch(url, sha256_of(archive_data), tmp_path, backoff=BACKOFF, limits=limits)

    assert "s3cret-value" not in str(error.value)
    assert "/shapes.zip?token=***" in str(error.value)


def test_fetch_fast_download_within_limits(
    server: Server, archive_data: bytes, tmp_path: Path
) -> None:
    url = server.add("/shapes.zip", archive_data)
    limits = DownloadLimits(max_seconds=30, min_rate=1000, rate_window=0.001)

    path = fetch(url, sha256_of(archive_data), tmp_path, backoff=BACKOFF, limits=limits)

    assert path.read_bytes() == archive_data


def test_fetch_not_found_fails_fast(server: Server, tmp_path: Path) -> None:
    url = server.base_url + "/missing.zip"

    with pytest.raises(ArchiveError) as error:
        fetch(url, "a" * 64, tmp_path, retries=4, backoff=BACKOFF)

    assert url in str(error.value)
    assert "404" in str(error.value)
    assert len(server.state.requests) == 1


def test_fetch_cached_archive_reused(
    server: Server, archive_data: bytes, tmp_path: Path
) -> None:
    url = server.add("/shapes.zip", archive_data)
    first = fetch(url, sha256_of(archive_data), tmp_path, backoff=BACKOFF)

    second = fetch(url, sha256_of(archive_data), tmp_path, backoff=BACKOFF)

    assert second == first
    assert len(server.state.requests) == 1


def test_fetch_corrupt_cache_replaced(
    server: Server, archive_data: bytes, tmp_path: Path
) -> None:
    url = server.add("/shapes.zip", archive_data)
    (tmp_path / "shapes.zip").write_bytes(b"truncated")

    path = fetch(url, sha256_of(archive_data), tmp_path, backoff=BACKOFF)

    assert path.read_bytes() == archive_data
    assert len(server.state.requests) == 1


@pytest.mark.parametrize(
    ("url_path", "cache_name"),
    [
        ("/files/my%20data%3B.tar.gz?version=2", "my_data_.tar.gz"),
        ("/latest/", None),
    ],
)
def test_fetch_cache_name_sanitised(
    server: Server,
    archive_data: bytes,
    tmp_path: Path,
    url_path: str,
    cache_name: str | None,
) -> None:
    url = server.add(url_path, archive_data)
    expected = sha256_of(archive_data)

    path = fetch(url, expected, tmp_path, backoff=BACKOFF)

    assert path.name == (cache_name or expected)


def test_fetch_local_path_verified(archive_data: bytes, tmp_path: Path) -> None:
    archive = tmp_path / "shapes.zip"
    archive.write_bytes(archive_data)
    cache_dir = tmp_path / "cache"

    from_path = fetch(str(archive), sha256_of(archive_data), cache_dir)
    from_url = fetch(archive.as_uri(), sha256_of(archive_data), cache_dir)

    assert from_path == archive
    assert from_url == archive
    assert not cache_dir.exists()


def test_fetch_local_wrong_checksum_kept(archive_data: bytes, tmp_path: Path) -> None:
    archive = tmp_path / "shapes.zip"
    archive.write_bytes(archive_data)

    with pytest.raises(ArchiveError) as error:
        fetch(str(archive), "b" * 64, tmp_path / "cache")

    assert sha256_of(archive_data) in str(error.value)
    assert archive.exists()


def test_fetch_missing_local_path(tmp_path: Path) -> None:
    missing = tmp_path / "absent.zip"

    with pytest.raises(ArchiveError, match="absent.zip"):
        fetch(str(missing), "c" * 64, tmp_path / "cache")


@pytest.mark.parametrize("sha256", ["abc", "g" * 64, "a" * 65])
def test_fetch_invalid_sha256(tmp_path: Path, sha256: str) -> None:
    with pytest.raises(ArchiveError, match=repr(sha256)):
        fetch(str(tmp_path / "shapes.zip"), sha256, tmp_path / "cache")


# ---------------------------------------------------------------------------
# extract


@pytest.mark.parametrize(
    "archive_format", ["zip", "tar", "tar.gz", "tar.bz2", "tar.xz"]
)
def test_extract_format_roundtrip(tmp_path: Path, archive_format: str) -> None:
    archive = write_archive(tmp_path / f"data.{archive_format}", archive_format, FILES)
    target = tmp_path / "raw"

    num_files = extract(archive, target, max_bytes=10_000, max_members=10)

    assert num_files == len(FILES)
    assert read_tree(target) == FILES
    assert temp_dirs(target) == []


def test_extract_detects_format_by_content(tmp_path: Path) -> None:
    archive = write_archive(tmp_path / "data.zip", "tar.gz", FILES)

    num_files = extract(archive, tmp_path / "raw", max_bytes=10_000, max_members=10)

    assert num_files == len(FILES)


def test_extract_unsupported_format(tmp_path: Path) -> None:
    archive = tmp_path / "data.zip"
    archive.write_bytes(b"<html>Not Found</html>")

    with pytest.raises(ArchiveError, match="unsupported format"):
        extract(archive, tmp_path / "raw", max_bytes=10_000, max_members=10)

    assert not (tmp_path / "raw").exists()


def test_extract_truncated_archive(tmp_path: Path) -> None:
    archive = write_archive(tmp_path / "data.tar.gz", "tar.gz", FILES)
    archive.write_bytes(archive.read_bytes()[:-200])
    target = tmp_path / "raw"

    with pytest.raises(ArchiveError, match="data.tar.gz"):
        extract(archive, target, max_bytes=10_000, max_members=10)

    assert not target.exists()
    assert temp_dirs(target) == []


@dataclass(frozen=True)
class UnsafeCase:
    """An archive builder, the member name the error must show, and the limits."""

    build: Callable[[Path], Path]
    member: str
    max_bytes: int = 10_000
    max_members: int = 10


UNSAFE_CASES = {
    "tar_absolute_path": UnsafeCase(
        lambda path: write_tar(path, [("/tmp/evil.txt", b"x")]), "/tmp/evil.txt"
    ),
    "zip_absolute_path": UnsafeCase(
        lambda path: write_zip(path, {"/tmp/evil.txt": b"x"}), "/tmp/evil.txt"
    ),
    "tar_parent_component": UnsafeCase(
        lambda path: write_tar(path, [("cats/../../evil.txt", b"x")]),
        "cats/../../evil.txt",
    ),
    "zip_backslash_parent": UnsafeCase(
        lambda path: write_zip(path, {"..\\evil.txt": b"x"}), "..\\evil.txt"
    ),
    "zip_drive_letter": UnsafeCase(
        lambda path: write_zip(path, {"C:/evil.txt": b"x"}), "C:/evil.txt"
    ),
    "tar_symlink_outside": UnsafeCase(
        lambda path: write_tar(
            path, [tar_header("cats/link", tarfile.SYMTYPE, "../../etc/passwd")]
        ),
        "cats/link",
    ),
    "tar_symlink_absolute": UnsafeCase(
        lambda path: write_tar(path, [tar_header("link", tarfile.SYMTYPE, "/etc")]),
        "link",
    ),
    "zip_symlink_outside": UnsafeCase(
        lambda path: zip_symlink(path, "cats/link", "../../etc/passwd"), "cats/link"
    ),
    "tar_hardlink_outside": UnsafeCase(
        lambda path: write_tar(
            path, [tar_header("cats/link", tarfile.LNKTYPE, "../secret.txt")]
        ),
        "cats/link",
    ),
    "tar_device_file": UnsafeCase(
        lambda path: write_tar(path, [tar_header("dev/null", tarfile.CHRTYPE)]),
        "dev/null",
    ),
    "tar_fifo": UnsafeCase(
        lambda path: write_tar(path, [tar_header("pipe", tarfile.FIFOTYPE)]), "pipe"
    ),
    "tar_duplicate_member": UnsafeCase(
        lambda path: write_tar(path, [("cats/a.png", b"1"), ("cats/a.png", b"2")]),
        "cats/a.png",
    ),
    "zip_duplicate_member": UnsafeCase(
        lambda path: write_zip_members(
            path, [("cats/a.png", b"1"), ("cats/a.png", b"2")]
        ),
        "cats/a.png",
    ),
    "tar_duplicate_after_normalising": UnsafeCase(
        lambda path: write_tar(path, [("cats/a.png", b"1"), ("./cats//a.png", b"2")]),
        "./cats//a.png",
    ),
    "zip_duplicate_backslash": UnsafeCase(
        lambda path: write_zip_members(
            path, [("cats/a.png", b"1"), ("cats\\a.png", b"2")]
        ),
        "cats\\a.png",
    ),
    "tar_hardlink_over_file": UnsafeCase(
        lambda path: write_tar(
            path,
            [
                ("cats/a.png", b"1"),
                ("cats/b.png", b"2"),
                tar_header("cats/a.png", tarfile.LNKTYPE, "cats/b.png"),
            ],
        ),
        "cats/a.png",
    ),
    "tar_file_inside_file": UnsafeCase(
        lambda path: write_tar(path, [("cats", b"1"), ("cats/a.png", b"2")]),
        "cats/a.png",
    ),
    "zip_file_over_folder": UnsafeCase(
        lambda path: write_zip_members(path, [("cats/a.png", b"1"), ("cats", b"2")]),
        "cats",
    ),
    "tar_folder_over_file": UnsafeCase(
        lambda path: write_tar(
            path, [("cats", b"1"), tar_header("cats/", tarfile.DIRTYPE)]
        ),
        "cats",  # tarfile drops the trailing slash of folder names
    ),
    "tar_too_many_members": UnsafeCase(
        lambda path: write_tar(path, [(f"file_{i}.txt", b"x") for i in range(5)]),
        "file_3.txt",
        max_members=3,
    ),
    "zip_too_large": UnsafeCase(
        lambda path: write_zip(path, {"a.bin": bytes(600), "b.bin": bytes(600)}),
        "b.bin",
        max_bytes=1000,
    ),
    "zip_understated_size": UnsafeCase(
        lambda path: zip_with_understated_size(path, "bomb.bin", declared=10),
        "bomb.bin",
        max_bytes=1000,
    ),
}


@pytest.mark.parametrize("case", UNSAFE_CASES.values(), ids=UNSAFE_CASES.keys())
def test_extract_unsafe_member_rejected(tmp_path: Path, case: UnsafeCase) -> None:
    archive = case.build(tmp_path / "unsafe.bin")
    target = tmp_path / "raw"

    with pytest.raises(ArchiveError) as error:
        extract(archive, target, max_bytes=case.max_bytes, max_members=case.max_members)

    assert repr(case.member) in str(error.value)
    assert not target.exists()
    assert temp_dirs(target) == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["unsafe.bin"]


def test_extract_skips_internal_symlink_and_macosx(tmp_path: Path) -> None:
    members = [
        ("cats/cat_0.png", b"cat"),
        tar_header("cats/alias.png", tarfile.SYMTYPE, "cat_0.png"),
        tar_header("cats/latest", tarfile.SYMTYPE, "../cats"),
        ("__MACOSX/cats/._cat_0.png", b"resource fork"),
    ]
    archive = write_tar(tmp_path / "data.tar", members)
    target = tmp_path / "raw"

    num_files = extract(archive, target, max_bytes=10_000, max_members=10)

    assert num_files == 1
    assert read_tree(target) == {"cats/cat_0.png": b"cat"}
    assert not (target / "cats" / "alias.png").is_symlink()
    assert not (target / "__MACOSX").exists()


def test_extract_repeated_folder_accepted(tmp_path: Path) -> None:
    members = [
        tar_header("cats/", tarfile.DIRTYPE),
        ("cats/a.png", b"cat"),
        tar_header("./cats", tarfile.DIRTYPE),
    ]
    archive = write_tar(tmp_path / "data.tar", members)
    target = tmp_path / "raw"

    num_files = extract(archive, target, max_bytes=10_000, max_members=10)

    assert num_files == 1
    assert read_tree(target) == {"cats/a.png": b"cat"}


def test_extract_duplicate_names_both_members(tmp_path: Path) -> None:
    members = [("cats/a.png", b"first"), ("dogs/b.png", b"dog"), ("cats/a.png", b"x")]
    archive = write_tar(tmp_path / "data.tar", members)

    with pytest.raises(ArchiveError) as error:
        extract(archive, tmp_path / "raw", max_bytes=10_000, max_members=10)

    message = str(error.value)
    assert "'cats/a.png' has the same path as the earlier file 'cats/a.png'" in (
        message
    )
    assert "each path appears once" in message


def test_extract_internal_hardlink_copied(tmp_path: Path) -> None:
    members = [
        ("cats/cat_0.png", b"cat"),
        tar_header("dogs/not_a_dog.png", tarfile.LNKTYPE, "cats/cat_0.png"),
    ]
    archive = write_tar(tmp_path / "data.tar", members)
    target = tmp_path / "raw"

    num_files = extract(archive, target, max_bytes=10_000, max_members=10)

    assert num_files == 2
    assert (target / "dogs" / "not_a_dog.png").read_bytes() == b"cat"


def test_extract_existing_target_rejected(tmp_path: Path) -> None:
    archive = write_archive(tmp_path / "data.zip", "zip", FILES)
    target = tmp_path / "raw"
    target.mkdir()
    (target / "keep.txt").write_bytes(b"kept")

    with pytest.raises(ArchiveError, match="already exists"):
        extract(archive, target, max_bytes=10_000, max_members=10)

    assert read_tree(target) == {"keep.txt": b"kept"}


def test_extract_stale_temp_dir_removed(tmp_path: Path) -> None:
    archive = write_archive(tmp_path / "data.zip", "zip", FILES)
    target = tmp_path / "raw"
    stale = tmp_path / ".raw.partial-killed"
    stale.mkdir()
    (stale / "half.png").write_bytes(b"half")

    extract(archive, target, max_bytes=10_000, max_members=10)

    assert not stale.exists()
    assert read_tree(target) == FILES


@pytest.mark.parametrize("limits", [(0, 10), (10_000, 0), (10_000, 1.5)])
def test_extract_invalid_limits(tmp_path: Path, limits: tuple[int, int]) -> None:
    archive = write_archive(tmp_path / "data.zip", "zip", FILES)
    max_bytes, max_members = limits

    with pytest.raises(ValueError, match="expected an integer >= 1"):
        extract(archive, tmp_path / "raw", max_bytes=max_bytes, max_members=max_members)


def test_fetch_then_extract(
    server: Server, archive_data: bytes, tmp_path: Path
) -> None:
    url = server.add("/shapes.zip", archive_data, drop_after=70_000, num_drops=1)
    path = fetch(url, sha256_of(archive_data), tmp_path / "cache", backoff=BACKOFF)

    num_files = extract(path, tmp_path / "raw", max_bytes=300_000, max_members=10)

    assert num_files == 1
    assert (tmp_path / "raw" / "images" / "noise.bin").stat().st_size == 200_000


def test_extract_target_mode_follows_umask(tmp_path: Path) -> None:
    archive = write_archive(tmp_path / "data.zip", "zip", FILES)
    umask = os.umask(0o022)
    try:
        extract(archive, tmp_path / "raw", max_bytes=10_000, max_members=10)
    finally:
        os.umask(umask)

    assert stat.S_IMODE((tmp_path / "raw").stat().st_mode) == 0o755
