"""Stage download: materialise the configured dataset under data/raw/.

Reads params: dataset. Writes: data/raw/<class>/<images>, replaced atomically,
so a failed download leaves the previous data/raw as it was. The archive
source also keeps verified archives in dataset.cache_dir between runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from stages import datasets
from stages.cli import run_stage
from stages.config import load_params
from stages.fsutil import atomic_dir

log = logging.getLogger("stages.download")

RAW_DIR = Path("data/raw")


def download(overrides: list[str], output: Path = RAW_DIR) -> dict[str, int]:
    """Materialise the dataset into `output` and return the count per class."""
    dataset = load_params(["dataset"], overrides).dataset
    log.info("Dataset '%s' from source '%s'", dataset.name, dataset.source)
    if dataset.source == "archive":
        datasets.check_cache_dir(Path(dataset.cache_dir), output)
    with atomic_dir(output) as tmp:
        counts = datasets.materialise(dataset, tmp)
    log.info(
        "Wrote %d files in %d classes to %s", sum(counts.values()), len(counts), output
    )
    return dict(counts)


if __name__ == "__main__":
    run_stage(download, __doc__)
