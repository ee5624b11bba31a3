"""Download dataset archives with checksum verification and extract them safely.

`fetch` returns a verified local copy of an archive given by http(s) URL or
local path. Downloads stream into `<name>.part` in the cache folder, retry
transient failures with exponential backoff, resume with HTTP Range requests,
and are renamed to their final name only after the SHA-256 matches. A download
that passes its deadline, or stays below a minimum average rate, is stopped
(see DownloadLimits).

`extract` unpacks a zip or tar archive (plain, gzip, bzip2 or xz) into a new
folder. It validates every member before writing anything and counts the bytes
it writes. It unpacks into a temporary sibling folder that replaces the target
only when complete. Symbolic links that stay inside the archive are skipped,
because a dataset loader needs none and writing through links is how archives
escape their folder. Hard links that stay inside are written as copies.
File modes and timestamps are not restored.
"""

from __future__ import annotations

import glob
import hashlib
import http.client
import logging
import lzma
import os
import re
import shutil
import stat
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from tqdm import tqdm

from stages.redaction import mask_uri

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 16
MAX_CACHE_NAME_LENGTH = 200
MAX_ZIP_LINK_LENGTH = 4096

_SHA256_PATTERN = re.compile(r"[0-9a-fA-F]{64}")
_DRIVE_PATTERN = re.compile(r"[A-Za-z]:")
_CONTENT_RANGE_PATTERN = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE_PATTERN = re.compile(r"bytes \*/(\d+)")

# Connection resets and refusals are ConnectionError subclasses, and
# socket.timeout is TimeoutError since Python 3.10.
_TRANSIENT_ERRORS = (ConnectionError, TimeoutError, http.client.IncompleteRead)

# Member kinds as the error messages name them.
_KIND_LABELS = {
    "symlink": "symbolic link",
    "hardlink": "hard link",
    "device": "device file",
    "fifo": "FIFO (named pipe)",
    "encrypted": "encrypted file",
    "other": "special file",
}

# Errors that tarfile, zipfile and the decompressors raise on damaged data.
# gzip and bz2 report damaged streams as OSError.
_CORRUPT_ARCHIVE_ERRORS = (
    tarfile.TarError,
    zipfile.BadZipFile,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    NotImplementedError,
    OSError,
)


class ArchiveError(ValueError):
    """Invalid download or archive.

    The message names the URL, file or member, and the fix.
    """


class _TransientError(Exception):
    """Download failure that a later attempt may not repeat, such as HTTP 503."""


class DownloadTooSlowError(ArchiveError):
    """A download passed its deadline or stayed below its minimum average rate."""


@dataclass(frozen=True)
class DownloadLimits:
    """Time limits of a download, named as the dataset config keys they come from.

    A download that passes a limit is stopped without a retry, because a
    retry would meet the same slow server.

    Attributes:
        max_seconds: Seconds for the whole download, retries and the waits
            between them included, or None for no limit.
        min_rate: Lowest average rate in bytes per second over each
            `rate_window`; 0 turns the check off.
        rate_window: Seconds over which the average rate is measured.
    """

    max_seconds: float | None = None
    min_rate: int = 1024
    rate_window: float = 60.0


class DownloadClock:
    """Enforce DownloadLimits on one download, across all its attempts.

    The limits are checked after each read. A read that receives nothing
    ends at the socket timeout, which `socket_timeout` shortens to the time
    left at the start of each attempt.
    """

    def __init__(
        self, url: str, limits: DownloadLimits, partial: Path | None = None
    ) -> None:
        self.url = mask_uri(url)
        self.limits = limits
        self.partial = partial  # kept for resuming, and named in the errors
        self.start = time.monotonic()
        self.received = 0
        self.start_window()

    def start_window(self) -> None:
        """Start a new rate window. Each attempt starts one, so the waits
        between attempts do not count as slow transfer."""
        self.window_start = time.monotonic()
        self.window_bytes = 0

    def remaining(self) -> float | None:
        """Return the seconds left before the deadline, or None without one."""
        if self.limits.max_seconds is None:
            return None
        return self.limits.max_seconds - (time.monotonic() - self.start)

    def socket_timeout(self, timeout: float) -> float:
        """Return `timeout`, shortened to the seconds left before the deadline."""
        remaining = self.remaining()
        if remaining is not None and remaining <= 0:
            raise self.deadline_error()
        return timeout if remaining is None else min(timeout, remaining)

    def deadline_error(self, cause: str = "") -> DownloadTooSlowError:
        """Return the error for a download that passed dataset.max_download_seconds."""
        return DownloadTooSlowError(
            f"Download of {self.url} did not finish within "
            f"dataset.max_download_seconds={self.limits.max_seconds:g} seconds "
            f"({self.received} bytes received{cause}). If the server is slow "
            "but working, raise dataset.max_download_seconds, or set it to "
            f"null for no limit.{self._resume_hint()}"
        )

    def update(self, num_bytes: int) -> None:
        """Count `num_bytes` just read, then check the deadline and the rate."""
        self.received += num_bytes
        self.window_bytes += num_bytes
        remaining = self.remaining()
        if remaining is not None and remaining <= 0:
            raise self.deadline_error()
        elapsed = time.monotonic() - self.window_start
        if not self.limits.min_rate or elapsed < self.limits.rate_window:
            return
        rate = self.window_bytes / elapsed
        if rate < self.limits.min_rate:
            raise DownloadTooSlowError(
                f"Download of {self.url} is too slow: {rate:.0f} bytes per "
                f"second over the last {elapsed:.1f} seconds, below "
                f"dataset.min_download_rate={self.limits.min_rate} bytes per "
                "second. If the server is slow but working, lower "
                "dataset.min_download_rate (0 turns the check off) or raise "
                f"dataset.download_rate_window.{self._resume_hint()}"
            )
        self.start_window()

    def _resume_hint(self) -> str:
        if self.partial is None:
            return ""
        return f" The next run resumes the partial download in {self.partial}."


# ---------------------------------------------------------------------------
# Download


def fetch(
    source: str,
    sha256: str,
    cache_dir: Path,
    *,
    retries: int = 4,
    timeout: float = 30.0,
    backoff: float = 1.0,
    limits: DownloadLimits | None = None,
) -> Path:
    """Verify an archive's SHA-256 and return its local path.

    A local path or file:// URL is verified in place. An http(s) URL is
    downloaded into `cache_dir` first, unless a verified copy is already there.

    Args:
        source: http(s) URL, file:// URL or local path of the archive.
        sha256: Expected SHA-256 of the archive as 64 hex digits.
        cache_dir: Folder for downloaded archives, created when missing.
        retries: Number of retries after the first attempt fails transiently.
        timeout: Seconds to wait for the connection and for each read.
        backoff: Seconds before the first retry, doubled for each next one.
        limits: Deadline and minimum rate of the download; None uses the
            defaults of DownloadLimits.

    Returns:
        Path of the archive, whose SHA-256 equals `sha256`.

    Raises:
        ArchiveError: If `sha256` is invalid, a local source is missing, the
            download fails, or the content does not match `sha256`.
            DownloadTooSlowError, a subclass, if the download passes a limit.
        ValueError: If `retries`, `timeout` or `backoff` is out of range.
    """
    expected = _validate_sha256(sha256)
    local_path = _local_path(source)
    if local_path is not None:
        _verify_local(local_path, expected)
        return local_path

    _validate_download_options(retries, timeout, backoff)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    destination = cache_dir / _cache_name(source, expected)
    if _is_cached(destination, expected):
        return destination

    logger.info("Downloading %s to %s", source, destination)
    clock = DownloadClock(
        source, limits or DownloadLimits(), partial=_part_path(destination)
    )
    _download(source, expected, destination, retries, timeout, backoff, clock)
    return destination


def _validate_sha256(sha256: str) -> str:
    if not isinstance(sha256, str) or not _SHA256_PATTERN.fullmatch(sha256):
        raise ArchiveError(
            f"Invalid sha256 {sha256!r}: expected 64 hexadecimal digits. "
            "Compute it with `sha256sum ARCHIVE` and set it in the config."
        )
    return sha256.lower()


def _validate_download_options(retries: int, timeout: float, backoff: float) -> None:
    if not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries={retries!r} is invalid: expected an integer >= 0.")
    if not timeout > 0:
        raise ValueError(f"timeout={timeout!r} is invalid: expected seconds > 0.")
    if not backoff >= 0:
        raise ValueError(f"backoff={backoff!r} is invalid: expected seconds >= 0.")


def _local_path(source: str) -> Path | None:
    """Return the path that `source` names, or None for an http(s) URL."""
    parts = urllib.parse.urlsplit(source)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return None
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ArchiveError(
                f"Unsupported file URL {source!r}: the host {parts.netloc!r} is "
                "not local. Mount the share and give its local path instead."
            )
        return Path(urllib.request.url2pathname(parts.path))
    # A one-letter scheme is a Windows drive such as C:\data.zip.
    if len(scheme) > 1:
        raise ArchiveError(
            f"Unsupported URL scheme {parts.scheme!r} in {source!r}: expected "
            "http, https, file or a local path."
        )
    return Path(source).expanduser()


def _verify_local(path: Path, expected: str) -> None:
    if not path.is_file():
        raise ArchiveError(
            f"Archive {path} not found (relative paths start at {Path.cwd()}). "
            "Check the path, or give an http(s) URL."
        )
    actual = _hash_file(path).hexdigest()
    if actual != expected:
        raise ArchiveError(
            f"Archive {path} has SHA-256 {actual}, but {expected} was expected. "
            "Replace the file, or update sha256 if this version is intended."
        )
    logger.info("Verified local archive %s", path)


def _hash_file(path: Path) -> hashlib._Hash:
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_SIZE):
            hasher.update(chunk)
    return hasher


def _cache_name(url: str, expected: str) -> str:
    """Return a safe file name from the URL path's last component, else the hash."""
    url_path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    last = url_path.rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", last).strip("._")
    return name[-MAX_CACHE_NAME_LENGTH:] or expected


def _is_cached(destination: Path, expected: str) -> bool:
    if not destination.is_file():
        return False
    if _hash_file(destination).hexdigest() == expected:
        logger.info("Reusing verified archive %s", destination)
        return True
    logger.warning("Deleting %s because its SHA-256 does not match", destination)
    destination.unlink()
    return False


def _part_path(destination: Path) -> Path:
    return destination.with_name(destination.name + ".part")


def _download(
    url: str,
    expected: str,
    destination: Path,
    retries: int,
    timeout: float,
    backoff: float,
    clock: DownloadClock,
) -> None:
    # NOTE: two processes downloading the same URL into one cache_dir at
    # once would write the same .part file; nothing locks it.
    part = _part_path(destination)
    for attempt in range(retries + 1):
        try:
            actual = _download_once(url, part, timeout, clock)
            break
        except _TransientError as error:
            if attempt == retries:
                raise ArchiveError(
                    f"Download of {url} failed after {retries + 1} attempts: "
                    f"{error}. Check the network and the server. The next run "
                    f"resumes any partial download in {part}."
                ) from error
            delay = backoff * 2**attempt
            remaining = clock.remaining()
            if remaining is not None and remaining <= delay:
                cause = f"; the last attempt failed with {error}"
                raise clock.deadline_error(cause) from error
            logger.warning(
                "Download of %s failed: %s. Retry %d of %d in %.2f s",
                url,
                error,
                attempt + 1,
                retries,
                delay,
            )
            time.sleep(delay)

    if actual != expected:
        part.unlink(missing_ok=True)
        raise ArchiveError(
            f"Download of {url} has SHA-256 {actual}, but {expected} was "
            "expected. The partial file was deleted. Check that the URL and "
            "sha256 refer to the same version of the archive."
        )
    os.replace(part, destination)
    logger.info("Downloaded %s (%d bytes)", destination, destination.stat().st_size)


def _download_once(url: str, part: Path, timeout: float, clock: DownloadClock) -> str:
    """Download `url` into `part`, resuming a partial file, and return its SHA-256."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    request = urllib.request.Request(url, headers=headers)
    clock.start_window()
    try:
        response = urllib.request.urlopen(
            request, timeout=clock.socket_timeout(timeout)
        )
    except urllib.error.HTTPError as error:
        with error:
            return _handle_http_error(error, url, part, offset)
    except urllib.error.URLError as error:
        raise _classify_error(error.reason, url) from error
    except (OSError, http.client.HTTPException) as error:
        raise _classify_error(error, url) from error

    with response:
        offset = _resume_offset(response, url, part, offset)
        hasher = _hash_file(part) if offset else hashlib.sha256()
        try:
            _stream_to_file(response, part, hasher, offset, clock)
        except (OSError, http.client.HTTPException) as error:
            raise _classify_error(error, url) from error
    return hasher.hexdigest()


def _classify_error(error: object, url: str) -> Exception:
    """Return a _TransientError for a failure worth retrying, else an ArchiveError."""
    if isinstance(error, _TRANSIENT_ERRORS):
        return _TransientError(repr(error))
    return ArchiveError(
        f"Download of {url} failed: {error!r}. Check the URL, the network "
        "and the free space in the cache folder."
    )


def _handle_http_error(
    error: urllib.error.HTTPError, url: str, part: Path, offset: int
) -> str:
    """Return the SHA-256 of `part` if the server reports it complete, else raise."""
    if error.code == 416 and offset:
        # The server rejected the resume offset. If the total size in its
        # Content-Range equals the offset, the partial file is complete.
        match = _UNSATISFIED_RANGE_PATTERN.fullmatch(
            error.headers.get("Content-Range", "")
        )
        if match and int(match.group(1)) == offset:
            return _hash_file(part).hexdigest()
        part.unlink()
        raise _TransientError(f"HTTP 416 for resume offset {offset}")
    if error.code >= 500 or error.code == 429:
        raise _TransientError(f"HTTP {error.code} {error.reason}")
    raise ArchiveError(
        f"Download of {url} failed with HTTP {error.code} {error.reason}. "
        "This status is not retried: check the URL and any access rights."
    )


def _resume_offset(
    response: http.client.HTTPResponse, url: str, part: Path, offset: int
) -> int:
    """Return the byte offset where the response body starts in `part`."""
    if response.status == 206 and offset:
        content_range = response.headers.get("Content-Range", "")
        match = _CONTENT_RANGE_PATTERN.fullmatch(content_range)
        if match is None or int(match.group(1)) != offset:
            part.unlink()
            raise _TransientError(
                f"invalid Content-Range {content_range!r} for a request from "
                f"byte {offset}, so the download restarts from byte 0"
            )
        logger.info("Resuming %s from byte %d", url, offset)
        return offset
    if response.status != 200:
        raise ArchiveError(
            f"Download of {url} returned HTTP {response.status}, but 200 or "
            "206 was expected. Check that the URL serves the archive file."
        )
    if offset:
        logger.info("Server ignored the Range request for %s, restarting at 0", url)
    return 0


def _stream_to_file(
    response: http.client.HTTPResponse,
    part: Path,
    hasher: hashlib._Hash,
    offset: int,
    clock: DownloadClock,
) -> None:
    """Append the response body to `part` at `offset`, updating `hasher`."""
    length_header = response.headers.get("Content-Length", "")
    length = int(length_header) if length_header.isdigit() else None
    total = offset + length if length is not None else None
    received = 0
    with (
        part.open("ab" if offset else "wb") as file,
        tqdm(
            total=total,
            initial=offset,
            desc=part.name,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
        ) as progress,
    ):
        # read1 returns what has arrived, where read would wait for a whole
        # chunk, so a slow server cannot keep the clock from being checked.
        while chunk := response.read1(CHUNK_SIZE):
            file.write(chunk)
            hasher.update(chunk)
            received += len(chunk)
            progress.update(len(chunk))
            clock.update(len(chunk))

    # http.client returns a short body without raising when the
    # connection closes early, so compare with Content-Length here.
    if length is not None and received < length:
        raise _TransientError(f"connection closed after {received} of {length} bytes")


# ---------------------------------------------------------------------------
# Extraction


@dataclass(frozen=True)
class _Entry:
    """One archive member as listed, before any check."""

    name: str
    kind: str  # file, dir, symlink, hardlink, device, fifo, encrypted or other
    size: int
    link: str
    info: tarfile.TarInfo | zipfile.ZipInfo


@dataclass(frozen=True)
class _Member:
    """A checked member to write: a file, a folder or a hard link copy."""

    name: str
    kind: str
    path: PurePosixPath
    size: int
    info: tarfile.TarInfo | zipfile.ZipInfo
    link: PurePosixPath | None = None


def extract(archive: Path, target: Path, *, max_bytes: int, max_members: int) -> int:
    """Extract a .zip, .tar, .tar.gz/.tgz, .tar.bz2 or .tar.xz into a new folder.

    The format is detected from the content, not the file name. Every member
    is checked before anything is written. The files are written into a
    temporary sibling folder, which replaces `target` only when complete and
    is removed on any error. `__MACOSX/` entries and symbolic links that stay
    inside the archive are skipped. Two members with the same path, after
    removing '.' components and reading '\\' as '/', are rejected, because
    the later one would overwrite the earlier.

    Args:
        archive: Archive file to extract.
        target: Folder to create; it must not exist yet.
        max_bytes: Maximum total unpacked size, checked against the declared
            member sizes and against the bytes actually written.
        max_members: Maximum number of members in the archive listing.

    Returns:
        Number of files written.

    Raises:
        ArchiveError: If the archive is missing, corrupt or of an unsupported
            format, `target` exists, or a member is unsafe or over a limit.
            The message names the member.
        ValueError: If `max_bytes` or `max_members` is not a positive integer.
    """
    archive, target = Path(archive), Path(target)
    _validate_extract_options(archive, target, max_bytes, max_members)
    archive_format = _detect_format(archive)
    _remove_stale_temp_dirs(target)

    # mkdir applies the umask, whereas tempfile.mkdtemp would leave the
    # target readable by its owner only.
    temp_dir = target.parent / f"{_temp_prefix(target)}{uuid.uuid4().hex}"
    temp_dir.mkdir(parents=True)
    try:
        num_files = _extract_into(
            archive, archive_format, temp_dir, max_bytes, max_members
        )
        os.replace(temp_dir, target)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    logger.info("Extracted %d files from %s into %s", num_files, archive, target)
    return num_files


def _validate_extract_options(
    archive: Path, target: Path, max_bytes: int, max_members: int
) -> None:
    for name, value in (("max_bytes", max_bytes), ("max_members", max_members)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: expected an integer >= 1.")
    if not archive.is_file():
        raise ArchiveError(f"Archive {archive} not found. Check the path.")
    if target.exists():
        raise ArchiveError(
            f"Target folder {target} already exists, and extract never writes "
            "into an existing folder. Delete it or choose another target."
        )


def _detect_format(archive: Path) -> str:
    """Return "zip" or "tar" from the archive's content."""
    # tar comes first: a plain tar whose last member is a zip file can pass
    # is_zipfile, which searches the end of the file for a zip directory.
    if tarfile.is_tarfile(archive):
        return "tar"
    if zipfile.is_zipfile(archive):
        return "zip"
    with archive.open("rb") as file:
        head = file.read(16)
    raise ArchiveError(
        f"Archive {archive} has an unsupported format (first bytes {head!r}): "
        "expected zip, tar, tar.gz, tar.bz2 or tar.xz. Check that the source "
        "is the archive itself and not, for example, an HTML page."
    )


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.partial-"


def _remove_stale_temp_dirs(target: Path) -> None:
    # NOTE: this also removes the folder of a concurrent extraction into the
    # same target, so extractions into one target must not run in parallel.
    pattern = glob.escape(str(target.parent / _temp_prefix(target))) + "*"
    for stale in glob.glob(pattern):
        logger.warning("Removing %s left by an interrupted extraction", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _extract_into(
    archive: Path, archive_format: str, temp_dir: Path, max_bytes: int, max_members: int
) -> int:
    try:
        if archive_format == "zip":
            with zipfile.ZipFile(archive) as zip_file:
                entries = _zip_entries(zip_file)
                members = _check_members(entries, archive, max_bytes, max_members)
                return _write_members(members, zip_file.open, temp_dir, max_bytes)
        with tarfile.open(archive, "r:*") as tar_file:
            entries = _tar_entries(tar_file)
            members = _check_members(entries, archive, max_bytes, max_members)
            return _write_members(members, tar_file.extractfile, temp_dir, max_bytes)
    except _CORRUPT_ARCHIVE_ERRORS as error:
        raise ArchiveError(
            f"Reading archive {archive} failed: {error}. If the archive is "
            "corrupt or truncated, delete it and download it again."
        ) from error


def _tar_entries(tar_file: tarfile.TarFile) -> Iterator[_Entry]:
    # Iterating reads one header at a time, so the member count is checked
    # before a huge listing is loaded.
    for info in tar_file:
        if info.isreg():
            kind = "file"
        elif info.isdir():
            kind = "dir"
        elif info.issym():
            kind = "symlink"
        elif info.islnk():
            kind = "hardlink"
        elif info.ischr() or info.isblk():
            kind = "device"
        elif info.isfifo():
            kind = "fifo"
        else:
            kind = "other"
        yield _Entry(info.name, kind, info.size, info.linkname, info)


def _zip_entries(zip_file: zipfile.ZipFile) -> Iterator[_Entry]:
    # NOTE: zipfile reads the whole central directory when it opens the
    # archive, so max_members cannot bound that memory for zip files.
    for info in zip_file.infolist():
        mode = info.external_attr >> 16
        link = ""
        if info.is_dir():
            kind = "dir"
        elif info.flag_bits & 0x1:
            kind = "encrypted"
        elif stat.S_ISLNK(mode):
            kind = "symlink"
            with zip_file.open(info) as stream:
                link = stream.read(MAX_ZIP_LINK_LENGTH).decode("utf-8", "replace")
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            kind = "device"
        elif stat.S_ISFIFO(mode):
            kind = "fifo"
        elif stat.S_ISSOCK(mode):
            kind = "other"
        else:
            kind = "file"
        yield _Entry(info.filename, kind, info.file_size, link, info)


def _check_members(
    entries: Iterator[_Entry], archive: Path, max_bytes: int, max_members: int
) -> list[_Member]:
    """Return the members to write, or raise ArchiveError on the first unsafe one."""
    members: list[_Member] = []
    file_sizes: dict[PurePosixPath, int] = {}
    # The member that first wrote each path, as a file or as a folder.
    files: dict[PurePosixPath, str] = {}
    folders: dict[PurePosixPath, str] = {}
    skipped: Counter[str] = Counter()
    declared_bytes = 0
    for count, entry in enumerate(entries, start=1):
        if count > max_members:
            raise ArchiveError(
                f"Archive {archive} has more than max_members={max_members} "
                f"members (member {entry.name!r} is number {count}). Raise "
                "max_members if the archive is trusted."
            )
        member = _check_entry(entry, file_sizes, skipped)
        if member is None:
            continue
        _check_path_conflict(member, files, folders)
        members.append(member)
        if member.kind != "dir":
            file_sizes[member.path] = member.size
        declared_bytes += member.size
        if declared_bytes > max_bytes:
            raise ArchiveError(
                f"Archive {archive} unpacks to more than max_bytes={max_bytes} "
                f"bytes (member {entry.name!r} brings it to {declared_bytes}). "
                "Raise max_bytes if the archive is trusted."
            )
    if skipped:
        summary = ", ".join(f"{count} {kind}" for kind, count in skipped.items())
        logger.info("Skipped %s in %s", summary, archive)
    return members


def _check_path_conflict(
    member: _Member,
    files: dict[PurePosixPath, str],
    folders: dict[PurePosixPath, str],
) -> None:
    """Record `member`'s path, raising ArchiveError if an earlier member has it.

    Paths are compared as `_member_path` returns them, so 'cats/a.png',
    './cats/a.png' and 'cats\\a.png' are one path. A folder may appear
    twice, because creating it again changes nothing.
    """
    ancestors = list(member.path.parents)[:-1]  # without the root "."
    for folder in ancestors:
        if folder in files:
            raise ArchiveError(
                f"Member {member.name!r} lies inside {folder.as_posix()!r}, but "
                f"the earlier member {files[folder]!r} is a file at that path. "
                "Recreate the archive so that no file and folder share a path."
            )
    if member.path in files:
        problem = f"has the same path as the earlier file {files[member.path]!r}"
    elif member.kind != "dir" and member.path in folders:
        problem = (
            "is a file at the path of the folder that the earlier member "
            f"{folders[member.path]!r} creates"
        )
    else:
        problem = None
    if problem:
        raise ArchiveError(
            f"Member {member.name!r} {problem}, so one would overwrite or block "
            "the other. Recreate the archive so that each path appears once."
        )
    if member.kind == "dir":
        folders.setdefault(member.path, member.name)
    else:
        files[member.path] = member.name
    for folder in ancestors:
        folders.setdefault(folder, member.name)


def _check_entry(
    entry: _Entry, file_sizes: dict[PurePosixPath, int], skipped: Counter[str]
) -> _Member | None:
    """Return the member to write, None to skip it, or raise ArchiveError."""
    path = _member_path(entry.name)
    if path.parts[:1] == ("__MACOSX",):
        skipped["__MACOSX/ entries"] += 1
        return None
    if entry.kind in ("device", "fifo", "encrypted", "other"):
        raise ArchiveError(
            f"Member {entry.name!r} is a {_KIND_LABELS[entry.kind]}, but only "
            "files, folders and links are extracted. Remove it from the archive."
        )
    if not path.parts:
        if entry.kind == "dir":
            return None  # the archive's root folder, such as "./"
        raise ArchiveError(
            f"Member {entry.name!r} has an empty path. Recreate the archive."
        )
    if entry.kind == "dir":
        return _Member(entry.name, "dir", path, 0, entry.info)
    if entry.kind == "symlink":
        # Symbolic links are resolved from the member's folder.
        _resolve_link(entry, path.parent)
        skipped["symbolic links inside the archive"] += 1
        return None
    if entry.kind == "hardlink":
        # tar stores hard link targets relative to the archive root.
        link = _resolve_link(entry, PurePosixPath())
        if link not in file_sizes:
            raise ArchiveError(
                f"Member {entry.name!r} is a hard link to {entry.link!r}, which "
                "is not a regular file earlier in the archive. Recreate the "
                "archive without this link."
            )
        return _Member(entry.name, "hardlink", path, file_sizes[link], entry.info, link)
    return _Member(entry.name, "file", path, entry.size, entry.info)


def _member_path(name: str) -> PurePosixPath:
    """Return the member's relative path, rejecting absolute and `..` paths."""
    # Backslashes count as separators, as in archives made on Windows, so a
    # name such as "..\evil" cannot pass the checks below.
    text = name.replace("\\", "/")
    if text.startswith("/") or _DRIVE_PATTERN.match(text):
        raise ArchiveError(
            f"Member {name!r} has an absolute path, which could overwrite any "
            "file. Recreate the archive with relative paths."
        )
    parts = [part for part in text.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(
            f"Member {name!r} contains a '..' component, which could write "
            "outside the target folder. Recreate the archive without it."
        )
    return PurePosixPath(*parts)


def _resolve_link(entry: _Entry, base: PurePosixPath) -> PurePosixPath:
    """Return the link target inside the archive, or raise ArchiveError."""
    text = entry.link.replace("\\", "/")
    parts = list(base.parts)
    outside = text.startswith("/") or bool(_DRIVE_PATTERN.match(text))
    for part in text.split("/"):
        if outside or part in ("", "."):
            continue
        if part != "..":
            parts.append(part)
        elif parts:
            parts.pop()
        else:
            outside = True
    if outside:
        raise ArchiveError(
            f"Member {entry.name!r} is a {_KIND_LABELS[entry.kind]} to "
            f"{entry.link!r}, which points outside the target folder. Remove the "
            "link from the archive."
        )
    return PurePosixPath(*parts)


def _write_members(
    members: list[_Member],
    open_member: Callable[..., IO[bytes] | None],
    temp_dir: Path,
    max_bytes: int,
) -> int:
    """Write the checked members under `temp_dir` and return the number of files."""
    written_bytes = 0
    file_paths: set[PurePosixPath] = set()
    for member in members:
        destination = temp_dir.joinpath(*member.path.parts)
        try:
            if member.kind == "dir":
                destination.mkdir(parents=True, exist_ok=True)
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            if member.kind == "hardlink":
                source = temp_dir.joinpath(*member.link.parts).open("rb")
            else:
                source = open_member(member.info)
            with source, destination.open("wb") as output:
                written_bytes = _copy_member(
                    member, source, output, written_bytes, max_bytes
                )
        except _CORRUPT_ARCHIVE_ERRORS as error:
            raise ArchiveError(
                f"Extracting member {member.name!r} failed: {error}. If the "
                "error concerns the data, the archive is corrupt: delete it and "
                "download it again. Otherwise check free disk space."
            ) from error
        file_paths.add(member.path)
    return len(file_paths)


def _copy_member(
    member: _Member, source: IO[bytes], output: IO[bytes], written: int, max_bytes: int
) -> int:
    """Copy one member and return the total bytes written so far."""
    member_bytes = 0
    while chunk := source.read(CHUNK_SIZE):
        member_bytes += len(chunk)
        written += len(chunk)
        # The declared sizes already fit, so only a header that understates
        # a member's size can reach this limit.
        if written > max_bytes:
            raise ArchiveError(
                f"Writing member {member.name!r} exceeded max_bytes={max_bytes} "
                "because its header understates its size. Do not use this archive."
            )
        output.write(chunk)
    if member_bytes != member.size:
        raise ArchiveError(
            f"Member {member.name!r} unpacked to {member_bytes} bytes, but its "
            f"header declares {member.size}. The archive is corrupt: delete it "
            "and download it again."
        )
    return written
