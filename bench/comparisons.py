"""Measured comparisons, each running its contenders in alternating order.

Every function returns plain dicts and lists that JSON can store. They hold
the values of each repetition, so the report can take medians and show the
spread.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.data import PhotoSet
from bench.measure import BenchError, Timed, run_timed
from bench.project import (
    ALL_STAGES,
    ROOT,
    check_stages,
    copy_project,
    epoch_seconds,
    pipeline_overrides,
    split_sizes,
    stages_run,
    train_metrics,
)

log = logging.getLogger(__name__)

PYTHON = sys.executable
# Adam's default learning rate, which the tutorial keeps. Comparisons 1, 3 and 4
# train with it.
DEFAULT_LEARNING_RATE = 0.001
# Trials that DVC's queue runs at a time in the queued sweep.
QUEUE_WORKERS = 2
_QUEUED_NAME = re.compile(r"Queued experiment '([^']+)'")


@dataclass(frozen=True)
class Settings:
    """Sizes and counts of one benchmark run."""

    mode: str  # "quick" or "full"
    num_images: int
    num_classes: int
    image_size: tuple[int, int]
    epochs: int
    repetitions: int
    noop_repetitions: int  # no-op `dvc repro` runs after each full repro
    learning_rates: tuple[float, ...]
    memory_copies: int  # the large preprocess set is this many copies
    matmul_sizes: tuple[int, ...]
    matmul_repeats: int


@dataclass
class Context:
    """Data sets, folders and command records of one benchmark run."""

    settings: Settings
    photos: PhotoSet
    many_photos: PhotoSet
    work_dir: Path
    log_dir: Path
    keep_work: bool = False
    extra_overrides: list[str] = field(default_factory=list)
    commands: list[dict] = field(default_factory=list)

    def run(
        self, name: str, command: list[str], cwd: Path, track_memory: bool = False
    ) -> Timed:
        """Run a command with a numbered log file named after `name`."""
        log_file = self.log_dir / f"{len(self.commands) + 1:03d}-{name}.log"
        log.info("%s: %s", name, " ".join(command))
        timed = run_timed(command, cwd, log_file, track_memory)
        self.commands.append(
            {
                "name": name,
                "seconds": timed.seconds,
                "cpu_seconds": timed.cpu_seconds,
                "other_cpu_seconds": timed.other_cpu_seconds,
            }
        )
        log.info(
            "%s took %.1f s; other processes used %.1f CPU s meanwhile",
            name,
            timed.seconds,
            timed.other_cpu_seconds,
        )
        return timed

    def new_copy(self, name: str) -> Path:
        """Make a fresh git copy of the project under the work folder."""
        return copy_project(self.work_dir / name)

    def discard(self, copy: Path) -> None:
        """Delete a project copy unless the run keeps them for inspection."""
        if not self.keep_work:
            shutil.rmtree(copy, ignore_errors=True)


def _first(rep: int) -> bool:
    """Tell whether the pipeline goes first in repetition `rep` (0-based)."""
    return rep % 2 == 0


def run_reference(ctx: Context, learning_rate: float, name: str, seed: int) -> dict:
    """Run bench/reference.py in a new process and return its result and time."""
    settings = ctx.settings
    result_file = ctx.log_dir / f"{name}.json"
    command = [
        PYTHON,
        "-m",
        "bench.reference",
        str(ctx.photos.path),
        "--epochs",
        str(settings.epochs),
        "--image-size",
        *map(str, settings.image_size),
        "--learning-rate",
        str(learning_rate),
        "--seed",
        str(seed),
        "--output",
        str(result_file),
    ]
    timed = ctx.run(name, command, ROOT)
    result = json.loads(result_file.read_text(encoding="utf-8"))
    return {**result, "process_seconds": timed.seconds}


def rep_seed(rep: int) -> int:
    """Return the seed of repetition `rep`, the same for both contenders.

    Each repetition draws another split and initialisation, so the medians
    of val accuracy compare the recipes rather than one lucky seed.
    """
    return 1000 + rep


def _overrides(ctx: Context, rep: int, learning_rate: float = DEFAULT_LEARNING_RATE):
    settings = ctx.settings
    base = pipeline_overrides(
        ctx.photos.path,
        settings.image_size,
        settings.epochs,
        learning_rate,
        rep_seed(rep),
    )
    return base + ctx.extra_overrides


def run_pipeline_repro(ctx: Context, rep: int) -> dict:
    """Compose params.yaml in a fresh copy, `dvc repro` all stages, then no-ops."""
    copy = ctx.new_copy(f"repro-{rep}")
    compose = ctx.run(
        f"repro{rep}-compose",
        [PYTHON, "-m", "stages.config", *_overrides(ctx, rep)],
        copy,
    )
    repro = ctx.run(f"repro{rep}-dvc-repro", ["dvc", "repro"], copy)
    check_stages(repro.output, ALL_STAGES, "dvc repro")

    metrics = train_metrics(copy)
    seconds, source = epoch_seconds(copy, metrics["mlflow_run_id"])
    noop = []
    for k in range(ctx.settings.noop_repetitions):
        again = ctx.run(f"repro{rep}-noop{k}", ["dvc", "repro"], copy)
        if stages_run(again.output):
            raise BenchError(
                f"dvc repro with nothing changed ran {stages_run(again.output)}; "
                f"see {ctx.log_dir}"
            )
        noop.append(again.seconds)
    result = {
        "process_seconds": repro.seconds,
        "compose_seconds": compose.seconds,
        "val_accuracy": metrics["val_accuracy"],
        "epoch_seconds": seconds,
        "epoch_seconds_source": source,
        "split_sizes": split_sizes(copy),
        "noop_seconds": noop,
    }
    ctx.discard(copy)
    return result


def compare_repro(ctx: Context) -> dict:
    """Run comparisons 1, 3 and 4: `dvc repro` from scratch against the reference.

    Each repro is followed by no-op repros in the same copy (comparison 4).
    """
    pipeline, reference = [], []
    for rep in range(ctx.settings.repetitions):
        log.info("Full repro against reference, repetition %d", rep + 1)
        name = f"repro{rep}-reference"
        if _first(rep):
            pipeline.append(run_pipeline_repro(ctx, rep))
            reference.append(
                run_reference(ctx, DEFAULT_LEARNING_RATE, name, rep_seed(rep))
            )
        else:
            reference.append(
                run_reference(ctx, DEFAULT_LEARNING_RATE, name, rep_seed(rep))
            )
            pipeline.append(run_pipeline_repro(ctx, rep))
    return {"pipeline": pipeline, "reference": reference}


def run_pipeline_sweep(ctx: Context, rep: int) -> dict:
    """Run one `dvc exp run` per learning rate in a fresh copy and sum the times."""
    copy = ctx.new_copy(f"sweep-{rep}")
    trials, accuracies = [], []
    for i, rate in enumerate(ctx.settings.learning_rates):
        overrides = [arg for o in _overrides(ctx, rep, rate) for arg in ("-S", o)]
        command = ["dvc", "exp", "run", *overrides]
        timed = ctx.run(f"sweep{rep}-exp{i}", command, copy)
        expected = ALL_STAGES if i == 0 else ["train", "evaluate"]
        check_stages(timed.output, expected, "dvc exp run")
        trials.append(timed.seconds)
        # `dvc exp run` leaves the experiment's outputs in the workspace.
        accuracies.append(train_metrics(copy)["val_accuracy"])
    ctx.discard(copy)
    return {
        "process_seconds": sum(trials),
        "trial_seconds": trials,
        "val_accuracy": accuracies,
    }


def run_pipeline_queue(ctx: Context, rep: int) -> dict:
    """Run the data stages once, then every learning rate through DVC's queue,
    QUEUE_WORKERS trials at a time, and sum the times of all the commands.

    This is the order the README gives for queued sweeps: the data stages
    first, so that no two trials run them at once.
    """
    copy = ctx.new_copy(f"queue-{rep}")
    compose = [PYTHON, "-m", "stages.config", *_overrides(ctx, rep)]
    steps = [ctx.run(f"queue{rep}-compose", compose, copy)]
    data = ctx.run(f"queue{rep}-data", ["dvc", "repro", "split"], copy)
    check_stages(data.output, ["download", "preprocess", "split"], "dvc repro split")
    steps.append(data)
    names = []
    for i, rate in enumerate(ctx.settings.learning_rates):
        overrides = [arg for o in _overrides(ctx, rep, rate) for arg in ("-S", o)]
        queued = ctx.run(
            f"queue{rep}-add{i}", ["dvc", "exp", "run", "--queue", *overrides], copy
        )
        names += _QUEUED_NAME.findall(queued.output)
        steps.append(queued)
    if len(names) != len(ctx.settings.learning_rates):
        raise BenchError(f"`dvc exp run --queue` named {names}; see {ctx.log_dir}")
    command = ["dvc", "exp", "run", "--run-all", "--jobs", str(QUEUE_WORKERS)]
    steps.append(ctx.run(f"queue{rep}-run", command, copy))
    exp_show = ctx.run(f"queue{rep}-show", ["dvc", "exp", "show", "--csv"], copy)
    accuracies = _experiment_accuracies(exp_show.output, names, copy)
    ctx.discard(copy)
    return {
        "process_seconds": sum(step.seconds for step in steps),
        "data_seconds": data.seconds,
        "queue_seconds": steps[-1].seconds,
        "val_accuracy": accuracies,
    }


def _experiment_accuracies(csv_output: str, names: list[str], copy: Path) -> list:
    """Return the val accuracy of each named experiment from the logged output
    of `dvc exp show --csv`, whose first two lines are the log's header."""
    table = io.StringIO("\n".join(csv_output.splitlines()[2:]))
    rows = {row["Experiment"]: row for row in csv.DictReader(table)}
    missing = [name for name in names if not rows.get(name, {}).get("val_accuracy")]
    if missing:
        raise BenchError(
            f"queued experiments {names} not all finished: {missing} missing from "
            f"`dvc exp show`; run `dvc queue logs NAME` in {copy} for the cause"
        )
    return [float(rows[name]["val_accuracy"]) for name in names]


def run_reference_sweep(ctx: Context, rep: int) -> dict:
    """Run the reference once per learning rate and sum the times."""
    trials = [
        run_reference(ctx, rate, f"sweep{rep}-reference{i}", rep_seed(rep))
        for i, rate in enumerate(ctx.settings.learning_rates)
    ]
    return {
        "process_seconds": sum(t["process_seconds"] for t in trials),
        "trial_seconds": [t["process_seconds"] for t in trials],
        "val_accuracy": [t["val_accuracy"] for t in trials],
    }


def compare_sweep(ctx: Context) -> dict:
    """Run comparison 2: a learning-rate sweep through DVC against the reference,
    one trial after another and through the queue."""
    pipeline, queue, reference = [], [], []
    for rep in range(ctx.settings.repetitions):
        log.info("Learning-rate sweep, repetition %d", rep + 1)
        if _first(rep):
            pipeline.append(run_pipeline_sweep(ctx, rep))
            queue.append(run_pipeline_queue(ctx, rep))
            reference.append(run_reference_sweep(ctx, rep))
        else:
            reference.append(run_reference_sweep(ctx, rep))
            queue.append(run_pipeline_queue(ctx, rep))
            pipeline.append(run_pipeline_sweep(ctx, rep))
    return {"pipeline": pipeline, "queue": queue, "reference": reference}


def _point_raw_dir(copy: Path, photos: PhotoSet) -> None:
    """Make data/raw in `copy` a symbolic link to `photos`, and drop old outputs."""
    raw = copy / "data/raw"
    if raw.is_symlink() or raw.is_file():
        raw.unlink()
    elif raw.exists():
        shutil.rmtree(raw)
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.symlink_to(photos.path, target_is_directory=True)
    shutil.rmtree(copy / "data/processed", ignore_errors=True)


def run_preprocess_stage(ctx: Context, copy: Path, photos: PhotoSet, name: str):
    """Run `python -m stages.preprocess` on `photos`, timing it and its peak RSS.

    Then stream one training epoch over the shards it wrote, for the peak RSS
    of the training input pipeline.
    """
    _point_raw_dir(copy, photos)
    command = [PYTHON, "-m", "stages.preprocess"]
    timed = ctx.run(name, command, copy, track_memory=True)
    written = json.loads((copy / "metrics/preprocess.json").read_text("utf-8"))
    if written["num_images"] != photos.num_images:
        raise BenchError(
            f"the preprocess stage wrote {written['num_images']} images of "
            f"{photos.num_images}; see {ctx.log_dir}"
        )
    stream = ctx.run(
        f"{name}-stream",
        [PYTHON, "-m", "bench.stream_epoch", str(copy)],
        ROOT,
        track_memory=True,
    )
    streamed = json.loads(stream.output.strip().splitlines()[-1])
    if streamed["images"] != photos.num_images:
        raise BenchError(
            f"one training epoch streamed {streamed['images']} images of "
            f"{photos.num_images}; see {ctx.log_dir}"
        )
    return {
        "seconds": timed.seconds,
        "images_per_second": photos.num_images / timed.seconds,
        "peak_rss_bytes": timed.peak_rss_bytes,
        "stream_seconds": streamed["seconds"],
        "stream_bytes": streamed["bytes"],
        "stream_peak_rss_bytes": stream.peak_rss_bytes,
    }


def run_pillow_loop(ctx: Context, name: str, draft: bool = False) -> dict:
    """Run the single-process Pillow loop on the small set in a new process."""
    command = [
        PYTHON,
        "-m",
        "bench.pillow_loop",
        str(ctx.photos.path),
        "--size",
        *map(str, ctx.settings.image_size),
    ]
    if draft:
        command.append("--draft")
    timed = ctx.run(name, command, ROOT)
    result = json.loads(timed.output.strip().splitlines()[-1])
    return {
        "seconds": timed.seconds,
        "loop_seconds": result["seconds"],
        "images_per_second": result["images"] / timed.seconds,
    }


def _preprocess_round(ctx: Context, copy: Path, rep: int) -> dict:
    """Run each preprocess contender once, in an order that alternates by rep."""
    contenders = {
        "stage_small": lambda: run_preprocess_stage(
            ctx, copy, ctx.photos, f"prep{rep}-stage-small"
        ),
        "pillow_loop": lambda: run_pillow_loop(ctx, f"prep{rep}-pillow"),
        "stage_large": lambda: run_preprocess_stage(
            ctx, copy, ctx.many_photos, f"prep{rep}-stage-large"
        ),
        "pillow_draft_loop": lambda: run_pillow_loop(
            ctx, f"prep{rep}-pillow-draft", draft=True
        ),
    }
    order = list(contenders) if _first(rep) else list(reversed(contenders))
    return {name: contenders[name]() for name in order}


def compare_preprocess(ctx: Context) -> dict:
    """Run comparison 5: preprocess throughput against Pillow, and memory growth."""
    copy = ctx.new_copy("preprocess")
    compose = [PYTHON, "-m", "stages.config", *_overrides(ctx, 0)]
    ctx.run("prep-compose", compose, copy)
    rounds = []
    for rep in range(ctx.settings.repetitions):
        log.info("Preprocess throughput and memory, repetition %d", rep + 1)
        rounds.append(_preprocess_round(ctx, copy, rep))
    ctx.discard(copy)
    return {name: [r[name] for r in rounds] for name in rounds[0]}


def measure_matmul(ctx: Context) -> dict:
    """Measure the float32 matmul peak in a new process."""
    settings = ctx.settings
    result_file = ctx.log_dir / "matmul.json"
    command = [
        PYTHON,
        "-m",
        "bench.flops",
        "--sizes",
        *map(str, settings.matmul_sizes),
        "--repeats",
        str(settings.matmul_repeats),
        "--output",
        str(result_file),
    ]
    ctx.run("matmul", command, ROOT)
    return json.loads(result_file.read_text(encoding="utf-8"))
