"""Dataset sources: each one materialises a folder of class sub-folders.

Whatever the source, the result is `<root>/<class name>/<image files>`, so
preprocessing treats every source alike:

- digits: scikit-learn's bundled handwritten digits, one PNG per sample.
- folder: a local folder of class folders, hard-linked or copied.
- table: a CSV or Parquet file that pairs image paths with labels.
- archive: a zip or tar archive of class folders, fetched by http(s) URL or
  local path and verified by its SHA-256 (see stages/archives.py).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import math
import os
import re
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from stages import archives
from stages.cli import InputError
from stages.config import DatasetConfig
from stages.images import is_ignored

log = logging.getLogger(__name__)

DIGITS_MAX_VALUE = 16  # load_digits stores intensities 0..16
TABLE_FORMATS = {".csv": "CSV", ".parquet": "Parquet", ".pq": "Parquet"}
MAX_LISTED = 5  # max rows or files that one error message names before a count
UNVERIFIED_DIR = "unverified"  # sub-folder of cache_dir for archives without sha256
DOWNLOAD_TIMEOUT = 30.0  # seconds to wait for the connection and for each read
CHUNK_SIZE = 1 << 16


def materialise(dataset: DatasetConfig, target: Path) -> Counter[str]:
    """Write the configured dataset into the empty folder `target`.

    Returns:
        Number of images written per class folder.

    Raises:
        InputError: naming the file, URL or key to fix.
    """
    if dataset.source == "digits":
        return export_digits(target)
    if dataset.source == "folder":
        source = Path(dataset.path).expanduser()
        log.info("Copying class folders from %s", source)
        return copy_folder(source, target)
    if dataset.source == "table":
        table = Path(dataset.path).expanduser()
        return export_table(table, target, dataset.image_column, dataset.label_column)
    return export_archive(dataset, target)


def export_digits(target: Path) -> Counter[str]:
    """Write scikit-learn's digits as one 8-bit grayscale PNG per sample.

    Returns:
        Number of images written per class.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / DIGITS_MAX_VALUE)).astype(np.uint8)
    counts: Counter[str] = Counter()
    for index, (image, label) in enumerate(
        tqdm(zip(pixels, digits.target, strict=True), total=len(pixels), desc="digits")
    ):
        folder = target / str(label)
        folder.mkdir(exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{index:04d}.png")
        counts[str(label)] += 1
    return counts


def _visible_folders(folder: Path) -> list[Path]:
    """Return the sub-folders of `folder` that are not hidden or system folders."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not is_ignored(p.name))


def _check_class_folder(source: Path) -> list[Path]:
    if not source.exists():
        raise InputError(
            f"dataset.path {source} does not exist; set dataset.path to a folder "
            "with one sub-folder per class"
        )
    if not source.is_dir():
        raise InputError(
            f"dataset.path {source} is a file, not a folder; set dataset.path to a "
            "folder with one sub-folder per class"
        )
    classes = _visible_folders(source)
    if not classes:
        raise InputError(
            f"dataset.path {source} has no class sub-folders; put each class's "
            "images in a sub-folder named after the class"
        )
    return classes


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(os.path.realpath(source), target)
    except OSError:
        shutil.copy2(source, target)


def _ignore_unsafe(root: Path):
    """Return a copytree filter that drops hidden files and unsafe links.

    A symbolic link is copied only when it points to a file inside `root`:
    links to folders could loop, and links leading outside would copy files
    the user never meant to add (such as /etc/shadow) into data/raw and DVC.
    """

    def ignore(folder: str, names: list[str]) -> list[str]:
        dropped = []
        for name in names:
            path = Path(folder, name)
            if is_ignored(name):
                dropped.append(name)
            elif path.is_symlink():
                target = path.resolve()
                if not target.is_file() or not target.is_relative_to(root):
                    log.warning(
                        "Skipped link %s -> %s (outside the folder, a "
                        "folder or missing)",
                        path,
                        target,
                    )
                    dropped.append(name)
        return dropped

    return ignore


def copy_folder(source: Path, target: Path) -> Counter[str]:
    """Copy a folder of class sub-folders into `target`, hard-linking where possible.

    Hidden and system files are left out. Returns the number of files per class.
    """
    counts: Counter[str] = Counter()
    class_dirs = _check_class_folder(source)
    loose = [p.name for p in source.iterdir() if p.is_file() and not is_ignored(p.name)]
    if loose:
        log.warning(
            "%d files in %s lie outside any class folder and are left out, e.g. %s",
            len(loose),
            source,
            ", ".join(sorted(loose)[:3]),
        )
    for class_dir in class_dirs:
        shutil.copytree(
            class_dir,
            target / class_dir.name,
            copy_function=_link_or_copy,
            ignore=_ignore_unsafe(source.resolve()),
        )
        counts[class_dir.name] = sum(
            1 for p in (target / class_dir.name).rglob("*") if p.is_file()
        )
    return counts


# ---------------------------------------------------------------------------
# Table: a CSV or Parquet file of image paths and labels


@dataclass(frozen=True)
class TableRow:
    """One usable row of a table: its number, image file and label."""

    number: int  # data row, counted from 1 without the CSV header
    image: Path
    label: str


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV or Parquet file, choosing the format by the file suffix.

    CSV cells are read as text, so an empty cell is "" and labels such as
    "NA" or "007" stay as written.

    Raises:
        InputError: If the file is missing, has another suffix or cannot be parsed.
    """
    if not path.is_file():
        raise InputError(
            f"dataset.path {path} not found or not a file; set dataset.path to a "
            "CSV or Parquet file with an image-path column and a label column"
        )
    table_format = TABLE_FORMATS.get(path.suffix.lower())
    if table_format is None:
        raise InputError(
            f"dataset.path {path} has the unsupported suffix '{path.suffix}'; "
            f"expected a table file ending in {', '.join(TABLE_FORMATS)}"
        )
    try:
        if table_format == "CSV":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        return pd.read_parquet(path)
    # pandas' ParserError and EmptyDataError, UnicodeDecodeError and pyarrow's
    # ArrowInvalid are all ValueError subclasses.
    except (ValueError, OSError) as error:
        raise InputError(
            f"Reading table {path} failed: {error}. Check that the file is a "
            f"valid {table_format} file."
        ) from error


def _check_columns(table: pd.DataFrame, path: Path, columns: dict[str, str]) -> None:
    """Raise InputError naming each configured column that the table lacks."""
    missing = [
        f"'{column}' (dataset.{key})"
        for key, column in columns.items()
        if column not in table.columns
    ]
    if missing:
        existing = ", ".join(repr(str(c)) for c in table.columns) or "none"
        raise InputError(
            f"Table {path} has no column {' and no column '.join(missing)}. "
            f"Its columns are: {existing}. Set dataset.image_column and "
            "dataset.label_column to the names of the image-path and label columns."
        )


def _cell_text(value: Any) -> str:
    """Return a table cell as stripped text, or "" for an empty or missing cell."""
    if (
        value is None
        or value is pd.NA
        or (isinstance(value, float) and math.isnan(value))
    ):
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a Parquet label column of 1.0, 2.0 names classes 1, 2
    return str(value).strip()


def _list_some(items: list[str]) -> str:
    """Join the first MAX_LISTED items and count the rest."""
    listed = ", ".join(items[:MAX_LISTED])
    rest = len(items) - MAX_LISTED
    return f"{listed} and {rest} more" if rest > 0 else listed


def _table_rows(
    table: pd.DataFrame, path: Path, image_column: str, label_column: str
) -> list[TableRow]:
    """Return the rows with their image paths resolved.

    Raises:
        InputError: If the table has no rows, or rows have an empty image path
            or label. The message lists the row numbers.
    """
    if table.empty:
        raise InputError(f"Table {path} has no rows; add one row per image")
    rows, problems = [], {image_column: [], label_column: []}
    cells = zip(table[image_column].tolist(), table[label_column].tolist(), strict=True)
    for number, (image_cell, label_cell) in enumerate(cells, start=1):
        image, label = _cell_text(image_cell), _cell_text(label_cell)
        if not image:
            problems[image_column].append(str(number))
        if not label:
            problems[label_column].append(str(number))
        if image and label:
            # An absolute image path replaces path.parent.
            rows.append(TableRow(number, path.parent / Path(image).expanduser(), label))
    messages = [
        f"column '{column}' is empty in data rows {_list_some(numbers)}"
        for column, numbers in problems.items()
        if numbers
    ]
    if messages:
        raise InputError(
            f"Table {path}: {'; '.join(messages)} (rows counted from 1 without "
            "the header). Fill in those cells or remove the rows."
        )
    return rows


def _check_images_exist(rows: list[TableRow], path: Path, image_column: str) -> None:
    """Raise InputError listing the image files that do not exist.

    A missing file stops the download instead of being skipped, because it
    means the table and the images are out of sync, and a silently smaller
    dataset would hide that.
    """
    missing = [
        f"{row.image} (data row {row.number})"
        for row in rows
        if not row.image.is_file()
    ]
    if missing:
        raise InputError(
            f"Table {path}: {len(missing)} of {len(rows)} image files in column "
            f"'{image_column}' not found: {_list_some(missing)}. Relative paths "
            f"start at {path.parent}. Fix the paths or remove those rows."
        )


def label_folder_name(label: str) -> str:
    """Return the class folder name for `label`.

    '/', '\\' and NUL become '_', so the label is one folder name on Linux,
    macOS and Windows. A name that preprocessing would skip as hidden or
    system ('.', '..', '.cache', 'Thumbs.db') gets a '_' prefix.
    """
    name = label
    for character in ("/", "\\", "\0"):
        name = name.replace(character, "_")
    return f"_{name}" if is_ignored(name) else name


def _label_folders(
    labels: Iterable[str], path: Path, label_column: str
) -> dict[str, str]:
    """Return the folder name of each label, raising InputError if two share one."""
    folders: dict[str, str] = {}
    owners: dict[str, str] = {}
    for label in sorted(set(labels)):
        folder = label_folder_name(label)
        if folder in owners:
            raise InputError(
                f"Labels {owners[folder]!r} and {label!r} in column '{label_column}' "
                f"of {path} both map to the folder name {folder!r}. Rename one of "
                "them in the table."
            )
        if folder != label:
            log.warning(
                "Label %r is written to folder %r, because folder names cannot "
                "contain '/', '\\' or NUL and must not be hidden or system names",
                label,
                folder,
            )
        owners[folder] = label
        folders[label] = folder
    return folders


def export_table(
    path: Path, target: Path, image_column: str = "image", label_column: str = "label"
) -> Counter[str]:
    """Hard-link or copy the images that a table lists into `target/<label>/`.

    Relative image paths start at the table's folder; absolute paths are used
    as they are. Cells lose surrounding whitespace. Each file is written as
    `<data row>_<file name>`, so rows that share a file name stay apart, and
    each label becomes a folder name as `label_folder_name` describes.

    Returns:
        Number of images written per class folder.

    Raises:
        InputError: If the table is missing or unreadable, lacks a column, has
            an empty cell, lists a missing image file, or two labels map to
            the same folder name.
    """
    log.info("Reading table %s", path)
    table = read_table(path)
    _check_columns(
        table, path, {"image_column": image_column, "label_column": label_column}
    )
    rows = _table_rows(table, path, image_column, label_column)
    _check_images_exist(rows, path, image_column)
    folders = _label_folders((row.label for row in rows), path, label_column)
    log.info("Table %s lists %d images in %d classes", path, len(rows), len(folders))

    width = len(str(len(table)))
    counts: Counter[str] = Counter()
    for row in tqdm(rows, desc="table", unit="img", mininterval=1.0):
        folder = target / folders[row.label]
        folder.mkdir(exist_ok=True)
        name = f"{row.number:0{width}d}_{row.image.name}"
        _link_or_copy(str(row.image), str(folder / name))
        counts[folder.name] += 1
    return counts


# ---------------------------------------------------------------------------
# Archive: a zip or tar file of class folders, verified by SHA-256


def check_cache_dir(cache_dir: Path, output: Path) -> None:
    """Raise InputError if `cache_dir` lies inside `output`, which each run replaces."""
    cache = cache_dir.expanduser().resolve()
    replaced = output.resolve()
    if cache == replaced or replaced in cache.parents:
        raise InputError(
            f"dataset.cache_dir {cache_dir} is inside {output}, which every "
            "download replaces, so cached archives would be lost. Set "
            "dataset.cache_dir to a folder outside it, e.g. .dvc/tmp/downloads"
        )


def _sha256_of(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _unverified_name(url: str) -> str:
    """Return a cache file name for `url`: a hash of the URL, then its file name."""
    last = urllib.parse.unquote(urllib.parse.urlsplit(url).path).rsplit("/", 1)[-1]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", last).strip("._")[-100:] or "archive"
    # Two URLs that end in the same file name get different cache files.
    return f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{safe}"


def download_limits(dataset: DatasetConfig) -> archives.DownloadLimits:
    """Return the download deadline and minimum rate set in the dataset section."""
    return archives.DownloadLimits(
        max_seconds=dataset.max_download_seconds,
        min_rate=dataset.min_download_rate,
        rate_window=dataset.download_rate_window,
    )


def _save_response(
    response: http.client.HTTPResponse, part: Path, clock: archives.DownloadClock
) -> None:
    """Write the response body to `part`, raising ConnectionError if it is short."""
    length_header = response.headers.get("Content-Length", "")
    total = int(length_header) if length_header.isdigit() else None
    received = 0
    with (
        part.open("wb") as file,
        tqdm(total=total, desc=part.name, unit="B", unit_scale=True) as progress,
    ):
        # read1 returns what has arrived, so the clock is checked even when
        # the server sends less than a chunk at a time.
        while chunk := response.read1(CHUNK_SIZE):
            file.write(chunk)
            received += len(chunk)
            progress.update(len(chunk))
            clock.update(len(chunk))
    # http.client returns a short body without raising when the connection
    # closes early, so compare with Content-Length.
    if total is not None and received < total:
        raise ConnectionError(f"connection closed after {received} of {total} bytes")


def _download_unverified(
    url: str, folder: Path, limits: archives.DownloadLimits
) -> Path:
    """Download `url` into `folder` once and return the file, reusing it later."""
    destination = folder / _unverified_name(url)
    if destination.is_file():
        log.info("Reusing unverified archive %s from %s", destination, url)
        return destination
    folder.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    log.info("Downloading %s to %s", url, destination)
    clock = archives.DownloadClock(url, limits)
    try:
        timeout = clock.socket_timeout(DOWNLOAD_TIMEOUT)
        with urllib.request.urlopen(url, timeout=timeout) as response:
            _save_response(response, part, clock)
    except archives.DownloadTooSlowError as error:
        part.unlink(missing_ok=True)
        raise InputError(str(error)) from error
    # URLError and HTTPError are OSError subclasses.
    except (OSError, http.client.HTTPException) as error:
        part.unlink(missing_ok=True)
        raise InputError(
            f"Download of {url} failed: {error}. Check dataset.url and the "
            "network, then run the download again."
        ) from error
    os.replace(part, destination)
    return destination


def _unverified_archive(
    url: str, cache_dir: Path, limits: archives.DownloadLimits
) -> tuple[str, str]:
    """Return a local file URL for the archive at `url` and its computed SHA-256.

    An http(s) archive is downloaded into `cache_dir/unverified/` unless an
    earlier run left it there. The hash is logged as a warning, so the user
    can pin it in dataset.sha256.
    """
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        local = _download_unverified(url, cache_dir / UNVERIFIED_DIR, limits)
    elif scheme == "file":
        local = Path(urllib.request.url2pathname(parts.path))
    elif len(scheme) <= 1:  # no scheme, or a Windows drive such as C:
        local = Path(url).expanduser()
    else:
        raise InputError(
            f"dataset.url {url!r} has the unsupported scheme '{parts.scheme}'; "
            "expected http, https, file or a local path"
        )
    if not local.is_file():
        raise InputError(f"Archive {local} not found; check dataset.url")
    actual = _sha256_of(local)
    log.warning(
        "Archive %s is unverified because dataset.sha256 is null. Its SHA-256 "
        "is %s. Check it, then pin it with dataset.sha256=%s",
        url,
        actual,
        actual,
    )
    return local.resolve().as_uri(), actual


def fetch_archive(
    url: str,
    sha256: str | None,
    cache_dir: Path,
    limits: archives.DownloadLimits | None = None,
) -> Path:
    """Return the local path of the archive at `url` after checking its SHA-256.

    Args:
        url: http(s) URL, file:// URL or local path of the archive.
        sha256: Expected SHA-256, or None to accept the archive as it is and
            log its hash (config validation allows None only together with
            dataset.allow_unverified).
        cache_dir: Folder that keeps downloaded archives between runs.
        limits: Deadline and minimum rate of an http(s) download; None uses
            the defaults of archives.DownloadLimits.

    Raises:
        InputError: If the download fails, passes a limit, or the hash does
            not match.
    """
    limits = limits or archives.DownloadLimits()
    if sha256 is None:
        url, sha256 = _unverified_archive(url, cache_dir, limits)
    try:
        return archives.fetch(url, sha256, cache_dir, limits=limits)
    except archives.ArchiveError as error:
        raise InputError(str(error)) from error


def _class_root(extracted: Path, subdir: str | None, archive: Path) -> Path:
    """Return the folder of the extracted archive that contains the class folders.

    That is `subdir` when set. Otherwise it is the archive root, or the root's
    only folder, such as `flower_photos/` in the TensorFlow flowers archive.
    """
    top = _visible_folders(extracted)
    if subdir:
        root = extracted.joinpath(*PurePosixPath(subdir.replace("\\", "/")).parts)
        if not root.is_dir():
            names = ", ".join(p.name for p in top) or "none"
            raise InputError(
                f"dataset.subdir {subdir!r} is not a folder in archive {archive}. "
                f"Its top-level folders are: {names}. Set dataset.subdir to the "
                "folder that holds the class folders, or to null."
            )
    elif len(top) == 1:
        # A classifier needs two classes or more, so a lone folder wraps them.
        root = top[0]
        log.info("Using %s/, the only folder at the root of %s", root.name, archive)
    else:
        root = extracted
    if not _visible_folders(root):
        where = f"folder {subdir!r}" if subdir else "its root"
        raise InputError(
            f"Archive {archive} has no class folders in {where}. Set "
            "dataset.subdir to the folder inside the archive that holds one "
            "folder per class."
        )
    return root


def export_archive(dataset: DatasetConfig, target: Path) -> Counter[str]:
    """Fetch, verify and extract an archive, then copy its class folders.

    The class folders are copied into `target` as `copy_folder` does, so
    hidden and system entries, and files beside the class folders, are left out.

    Returns:
        Number of images written per class folder.

    Raises:
        InputError: If fetching, verifying or extracting fails, or the archive
            has no class folders.
    """
    archive = fetch_archive(
        dataset.url,
        dataset.sha256,
        Path(dataset.cache_dir).expanduser(),
        download_limits(dataset),
    )
    # The scratch folder's name starts with target's name, so the stale-folder
    # cleanup of fsutil.atomic_dir also removes one that a killed run left.
    with tempfile.TemporaryDirectory(
        prefix=f"{target.name}-archive-", dir=target.parent
    ) as scratch:
        extracted = Path(scratch) / "contents"
        try:
            num_files = archives.extract(
                archive,
                extracted,
                max_bytes=dataset.max_bytes,
                max_members=dataset.max_members,
            )
        except archives.ArchiveError as error:
            raise InputError(str(error)) from error
        log.info("Extracted %d files from %s", num_files, archive)
        root = _class_root(extracted, dataset.subdir, archive)
        return copy_folder(root, target)
