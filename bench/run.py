"""Run the benchmarks and write their report.

`python -m bench.run` (or `make bench`) generates the data once into
bench/data/, runs every comparison and appends a section to
docs/benchmarks.md. `--quick` runs a small version of each comparison to
check the harness, and writes its report to bench/results/ only. Raw results
(JSON) and the output of every command go to bench/results/<run>/ either way.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from bench.comparisons import (
    Context,
    Settings,
    compare_preprocess,
    compare_repro,
    compare_sweep,
    measure_matmul,
)
from bench.data import generate_photos, repeat_photos
from bench.measure import load_average, machine_facts
from bench.project import ROOT
from bench.report import append_to_docs, render_section

log = logging.getLogger("bench.run")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COMPARISONS = ("repro", "sweep", "preprocess")
LEARNING_RATES = (0.0005, 0.001, 0.002, 0.004)

FULL = Settings(
    mode="full",
    num_images=2000,
    num_classes=4,
    image_size=(128, 128),
    epochs=10,
    repetitions=3,
    noop_repetitions=3,
    learning_rates=LEARNING_RATES,
    memory_copies=10,
    matmul_sizes=(2048, 4096),
    matmul_repeats=5,
)
QUICK = Settings(
    mode="quick",
    num_images=200,
    num_classes=4,
    image_size=(128, 128),
    epochs=2,
    repetitions=1,
    noop_repetitions=2,
    learning_rates=LEARNING_RATES,
    memory_copies=10,
    matmul_sizes=(1024, 2048),
    matmul_repeats=3,
)


def parse_args() -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="200 images, 2 epochs, 1 repetition; report to bench/results/ only",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=COMPARISONS,
        default=list(COMPARISONS),
        help="run only these comparisons (repro covers comparisons 1, 3 and 4)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="add a Hydra override to the pipeline's configuration, e.g. "
        "train.precision=mixed_bfloat16; repeat for several",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="folder for the project copies (default: a new temporary folder)",
    )
    parser.add_argument(
        "--keep-work",
        action="store_true",
        help="keep the project copies after the run, for inspection",
    )
    return parser.parse_args()


def _make_context(settings: Settings, args, log_dir: Path, work_dir: Path):
    photos = generate_photos(settings.num_images, settings.num_classes)
    many_photos = repeat_photos(photos, settings.memory_copies)
    log.info(
        "Data: %d images in %s, %d in %s",
        photos.num_images,
        photos.path,
        many_photos.num_images,
        many_photos.path,
    )
    return Context(
        settings,
        photos,
        many_photos,
        work_dir,
        log_dir,
        args.keep_work,
        args.overrides,
    )


def run_comparisons(ctx: Context, selected: list[str], results: dict) -> None:
    """Measure the matmul peak, then each selected comparison, into `results`.

    Each comparison's values are stored as soon as it ends, so a failure
    later in the run keeps them.
    """
    tasks = {
        "repro": compare_repro,
        "sweep": compare_sweep,
        "preprocess": compare_preprocess,
    }
    results["matmul"] = measure_matmul(ctx)
    for name in COMPARISONS:
        if name in selected:
            results[name] = tasks[name](ctx)


def main() -> None:
    """Run the benchmarks and write the results and the report."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    args = parse_args()
    settings = QUICK if args.quick else FULL
    started = datetime.now(UTC)
    run_name = f"{started:%Y%m%d-%H%M%S}-{settings.mode}"
    results_dir = RESULTS_DIR / run_name
    log_dir = results_dir / "logs"
    log_dir.mkdir(parents=True)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="image-pipeline-bench-"))
    meta = {
        "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
        "started": f"{started:%Y-%m-%d %H:%M} UTC",
        "machine": machine_facts(ROOT),
        "load_start": load_average(),
        "results_dir": str(results_dir.relative_to(ROOT)),
        "only": [name for name in COMPARISONS if name in args.only],
        "extra_overrides": args.overrides,
    }
    log.info("Benchmark run %s, settings %s", run_name, settings)

    clock = time.perf_counter()
    ctx = _make_context(settings, args, log_dir, work_dir)
    results: dict = {}
    try:
        run_comparisons(ctx, args.only, results)
    finally:
        meta.update(
            load_end=load_average(),
            minutes=(time.perf_counter() - clock) / 60,
            mean_file_kib=ctx.photos.mean_file_bytes / 1024,
            completed=list(results),
        )
        raw = {
            "settings": asdict(settings),
            "meta": meta,
            "results": results,
            "commands": ctx.commands,
        }
        (results_dir / "results.json").write_text(json.dumps(raw, indent=2), "utf-8")
        if args.keep_work:
            log.info("Project copies kept in %s", work_dir)
        elif args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)

    section = render_section(results, settings, meta, ctx.commands)
    (results_dir / "report.md").write_text(section, encoding="utf-8")
    if settings.mode == "full":
        append_to_docs(section)
        log.info("Appended the results to docs/benchmarks.md")
    log.info("Report: %s\n%s", results_dir / "report.md", section)


if __name__ == "__main__":
    main()
