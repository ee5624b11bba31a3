"""Medians, ratios and targets of a benchmark run, rendered as Markdown."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from statistics import median

from bench.flops import TRAIN_STEP_FACTOR, cnn_forward_flops

DOCS_FILE = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
RUNS_HEADING = "## Runs"
# Above this share of all cores used by other processes, a run is flagged.
CONTENTION_WARNING = 0.05
# Names of the commands that run the queued sweep's trials.
QUEUE_RUN = re.compile(r"queue\d+-run")

# The page that a first full run creates, when docs/benchmarks.md is missing.
DOCS_TEMPLATE = Path(__file__).resolve().parent / "benchmarks_template.md"


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    number: str
    name: str
    pipeline: str
    reference: str
    ratio: str
    target: str
    result: str


def _verdict(passed: bool | None) -> str:
    if passed is None:
        return "n/a"
    return "PASS" if passed else "FAIL"


def _throughput(num_train: int, seconds: list[float]) -> float | None:
    return num_train / median(seconds) if seconds else None


def _flop_rate(forward: int, num_train: int, num_val: int, seconds: list[float]):
    """Return the GFLOP/s of one epoch: training steps and the validation pass."""
    if not seconds:
        return None
    work = TRAIN_STEP_FACTOR * forward * num_train + forward * num_val
    return work / median(seconds) / 1e9


def summarise_repro(repro: dict, forward_flops: int) -> dict:
    """Take the medians of comparisons 1, 3 and 4 over the repetitions."""
    pipeline, reference = repro["pipeline"], repro["reference"]
    pipe_rates, ref_rates, pipe_flops, ref_flops = [], [], [], []
    for run in pipeline:
        sizes, seconds = run["split_sizes"], run["epoch_seconds"]
        pipe_rates.append(_throughput(sizes["train"], seconds))
        pipe_flops.append(
            _flop_rate(forward_flops, sizes["train"], sizes["val"], seconds)
        )
    for run in reference:
        seconds = run["epoch_seconds"][1:]
        ref_rates.append(_throughput(run["num_train"], seconds))
        ref_flops.append(
            _flop_rate(forward_flops, run["num_train"], run["num_val"], seconds)
        )
    return {
        "pipeline_seconds": median(r["process_seconds"] for r in pipeline),
        "reference_seconds": median(r["process_seconds"] for r in reference),
        "pipeline_val_accuracy": median(r["val_accuracy"] for r in pipeline),
        "reference_val_accuracy": median(r["val_accuracy"] for r in reference),
        "pipeline_images_per_second": _median_or_none(pipe_rates),
        "reference_images_per_second": _median_or_none(ref_rates),
        "pipeline_gflops": _median_or_none(pipe_flops),
        "reference_gflops": _median_or_none(ref_flops),
        "noop_seconds": median(s for r in pipeline for s in r["noop_seconds"]),
    }


def _median_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return median(present) if present else None


def summarise_preprocess(prep: dict) -> dict:
    """Take the medians of comparison 5's throughputs and peak memory."""

    def middle(name: str, key: str) -> float:
        return median(r[key] for r in prep[name])

    return {
        "stage_images_per_second": middle("stage_small", "images_per_second"),
        "pillow_images_per_second": middle("pillow_loop", "images_per_second"),
        "pillow_draft_images_per_second": middle(
            "pillow_draft_loop", "images_per_second"
        ),
        "stage_large_images_per_second": middle("stage_large", "images_per_second"),
        "small_peak_rss_bytes": middle("stage_small", "peak_rss_bytes"),
        "large_peak_rss_bytes": middle("stage_large", "peak_rss_bytes"),
        "small_stream_rss_bytes": middle("stage_small", "stream_peak_rss_bytes"),
        "large_stream_rss_bytes": middle("stage_large", "stream_peak_rss_bytes"),
        "large_stream_bytes": middle("stage_large", "stream_bytes"),
    }


def forward_flops(settings) -> int:
    """Count the forward FLOPs per image of the tutorial's CNN."""
    layers = cnn_forward_flops(
        settings.image_size, 3, [16, 32, 64], 1, 3, [128], settings.num_classes
    )
    return sum(layer.flops for layer in layers)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _fmt(value: float | None, digits: int = 1, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{unit}"


def _ratio_row(number, name, pipe, ref, limit, at_most, unit, digits=1) -> Row:
    ratio = _ratio(pipe, ref)
    passed = None
    if ratio is not None:
        passed = ratio <= limit if at_most else ratio >= limit
    sign = "<=" if at_most else ">="
    return Row(
        number,
        name,
        _fmt(pipe, digits, unit),
        _fmt(ref, digits, unit),
        _fmt(ratio, 2, "x"),
        f"{sign} {limit}x",
        _verdict(passed),
    )


def repro_rows(summary: dict) -> list[Row]:
    """Build the rows of comparisons 1, 3 and 4."""
    accuracy_gap = 100 * (
        summary["pipeline_val_accuracy"] - summary["reference_val_accuracy"]
    )
    noop = summary["noop_seconds"]
    return [
        _ratio_row(
            "1",
            "`dvc repro` from scratch, wall time",
            summary["pipeline_seconds"],
            summary["reference_seconds"],
            1.1,
            True,
            " s",
        ),
        Row(
            "1",
            "final val accuracy",
            _fmt(100 * summary["pipeline_val_accuracy"], 1, "%"),
            _fmt(100 * summary["reference_val_accuracy"], 1, "%"),
            f"{accuracy_gap:+.1f} points",
            "within 2 points",
            _verdict(abs(accuracy_gap) <= 2.0),
        ),
        _ratio_row(
            "3",
            "training throughput after epoch 1 (images/s)",
            summary["pipeline_images_per_second"],
            summary["reference_images_per_second"],
            1.0,
            False,
            "",
        ),
        Row(
            "4",
            "`dvc repro` with nothing changed",
            _fmt(noop, 2, " s"),
            "",
            "",
            "<= 2 s",
            _verdict(noop <= 2.0),
        ),
    ]


def sweep_rows(sweep: dict) -> list[Row]:
    """Build the rows of comparison 2: trials one after another, and queued."""
    reference = median(r["process_seconds"] for r in sweep["reference"])
    rows = [
        _ratio_row(
            "2",
            "4-trial learning-rate sweep, one `dvc exp run` after another, wall time",
            median(r["process_seconds"] for r in sweep["pipeline"]),
            reference,
            0.6,
            True,
            " s",
        )
    ]
    if sweep.get("queue"):
        rows.append(
            _ratio_row(
                "2",
                "the same sweep through DVC's queue, 2 trials at a time, after "
                "one `dvc repro split`, wall time",
                median(r["process_seconds"] for r in sweep["queue"]),
                reference,
                0.6,
                True,
                " s",
            )
        )
    return rows


def preprocess_rows(summary: dict, settings) -> list[Row]:
    """Build the rows of comparison 5, whose reference is the Pillow loop."""
    small, large = summary["small_peak_rss_bytes"], summary["large_peak_rss_bytes"]
    mib = 1024**2
    num_small = settings.num_images
    num_large = num_small * settings.memory_copies
    return [
        _ratio_row(
            "5",
            f"preprocess throughput, {num_small:,} images (images/s; "
            "reference: 1-process Pillow loop)",
            summary["stage_images_per_second"],
            summary["pillow_images_per_second"],
            1.7,
            False,
            "",
        ),
        _ratio_row(
            "5",
            f"preprocess peak RSS, {num_large:,} against {num_small:,} images "
            "(reference column: the smaller set)",
            large / mib,
            small / mib,
            1.2,
            True,
            " MiB",
            0,
        ),
        _ratio_row(
            "5",
            f"training input peak RSS, one epoch streamed from the shards, "
            f"{num_large:,} against {num_small:,} images (reference column: the "
            "smaller set)",
            summary["large_stream_rss_bytes"] / mib,
            summary["small_stream_rss_bytes"] / mib,
            1.2,
            True,
            " MiB",
            0,
        ),
    ]


def render_table(rows: list[Row]) -> str:
    """Render the results table in Markdown."""
    lines = [
        "| # | Comparison | Pipeline | Reference | Ratio | Target | Result |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        cells = [row.number, row.name, row.pipeline, row.reference]
        cells += [row.ratio, row.target, row.result]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _values(values: list[float], digits: int = 1) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def repetition_lines(results: dict) -> list[str]:
    """List every repetition's value behind the medians."""
    lines = []
    repro = results.get("repro")
    if repro:
        pipe, ref = repro["pipeline"], repro["reference"]
        lines.append(
            f"- `dvc repro` (s): {_values([r['process_seconds'] for r in pipe])}; "
            f"reference (s): {_values([r['process_seconds'] for r in ref])}"
        )
        lines.append(
            "- val accuracy: "
            f"{_values([100 * r['val_accuracy'] for r in pipe])}; reference: "
            f"{_values([100 * r['val_accuracy'] for r in ref])}"
        )
        noop = [s for r in pipe for s in r["noop_seconds"]]
        lines.append(f"- no-op `dvc repro` (s): {_values(noop, 2)}")
        lines.append(
            "- pipeline epochs after the first (s): "
            + "; ".join(_values(r["epoch_seconds"], 2) for r in pipe)
            + "; reference: "
            + "; ".join(_values(r["epoch_seconds"][1:], 2) for r in ref)
        )
    sweep = results.get("sweep")
    if sweep:
        for side in ("pipeline", "reference"):
            trials = "; ".join(_values(r["trial_seconds"]) for r in sweep[side])
            lines.append(f"- sweep trials, {side} (s): {trials}")
            accuracy = "; ".join(
                _values([100 * a for a in r["val_accuracy"]]) for r in sweep[side]
            )
            lines.append(f"- sweep trials, {side} val accuracy (%): {accuracy}")
        queued = sweep.get("queue") or []
        if queued:
            lines.append(
                "- queued sweep, data stages then the queue (s): "
                + "; ".join(
                    f"{r['data_seconds']:.1f}, {r['queue_seconds']:.1f}" for r in queued
                )
                + "; in all: "
                + _values([r["process_seconds"] for r in queued])
            )
            accuracy = "; ".join(
                _values([100 * a for a in r["val_accuracy"]]) for r in queued
            )
            lines.append(f"- queued sweep val accuracy (%): {accuracy}")
    prep = results.get("preprocess")
    if prep:
        for name, runs in prep.items():
            rates = _values([r["images_per_second"] for r in runs])
            lines.append(f"- preprocess {name.replace('_', ' ')} (images/s): {rates}")
        for name in ("stage_small", "stage_large"):
            mib = [r["stream_peak_rss_bytes"] / 1024**2 for r in prep[name]]
            peaks = _values(mib, 0)
            lines.append(
                f"- training input, one epoch over the {name.split('_')[1]} set, "
                f"peak RSS (MiB): {peaks}"
            )
    return lines


def _machine_line(machine: dict) -> str:
    features = ", ".join(machine["cpu_features"]) or "no AVX"
    return (
        f"{machine['cpu_model']}, {machine['cpu_cores']} cores ({features}), "
        f"{machine['memory_gib']} GiB RAM, {machine['os']}; Python "
        f"{machine['python']}, TensorFlow {machine['tensorflow']}, Keras "
        f"{machine['keras']}, DVC {machine['dvc']}, MLflow {machine['mlflow']}, "
        f"Pillow {machine['pillow']}"
    )


def _flop_lines(results: dict, summary: dict, settings) -> list[str]:
    matmul = results.get("matmul")
    forward = forward_flops(settings)
    lines = [
        f"- Model FLOPs: {forward / 1e6:.1f} MFLOP forward per image (convolutions "
        f"and dense layers, counted from the layer shapes in bench/flops.py); a "
        f"training step counts {TRAIN_STEP_FACTOR}x, and the validation pass 1x."
    ]
    if not matmul or not summary:
        return lines
    peak = matmul["peak_gflops"]
    sizes = ", ".join(f"{n}: {g:.0f}" for n, g in matmul["gflops_by_size"].items())
    lines.append(
        f"- float32 matmul peak: {peak:.1f} GFLOP/s (best of {matmul['repeats']} "
        f"per size; GFLOP/s by size n of n x n: {sizes})."
    )
    for side in ("pipeline", "reference"):
        rate = summary[f"{side}_gflops"]
        if rate is not None:
            lines.append(
                f"- Training FLOP rate, {side}: {rate:.1f} GFLOP/s, "
                f"{100 * rate / peak:.0f}% of the matmul peak."
            )
    return lines


def _rows(results: dict, settings) -> tuple[list[Row], dict, dict]:
    """Build the table rows and return them with the repro and preprocess medians."""
    rows, repro_summary, prep_summary = [], {}, {}
    if "repro" in results:
        repro_summary = summarise_repro(results["repro"], forward_flops(settings))
        rows += repro_rows(repro_summary)
    if "sweep" in results:
        rows += sweep_rows(results["sweep"])
    if "preprocess" in results:
        prep_summary = summarise_preprocess(results["preprocess"])
        rows += preprocess_rows(prep_summary, settings)
    rows.sort(key=lambda row: row.number)
    return rows, repro_summary, prep_summary


def _contention_line(commands: list[dict], cores: int) -> str:
    """Describe how much CPU other processes took while commands were measured.

    The queued sweep's trials run in DVC's detached workers, whose CPU time
    looks like other processes', so those commands are left out.
    """
    commands = [c for c in commands if not QUEUE_RUN.fullmatch(c["name"])]
    wall = sum(c["seconds"] for c in commands)
    other = sum(c["other_cpu_seconds"] for c in commands)
    share = other / (wall * cores) if wall else 0.0
    worst = max(commands, key=lambda c: c["other_cpu_seconds"] / c["seconds"])
    worst_share = worst["other_cpu_seconds"] / (worst["seconds"] * cores)
    line = (
        f"- Other processes used {100 * share:.1f}% of the {cores} cores while "
        f"commands were measured (the most: {100 * worst_share:.0f}% during "
        f"{worst['name']})."
    )
    if share > CONTENTION_WARNING:
        line += " WARNING: the machine was busy, so these figures are too slow."
    return line


def _fact_lines(settings, meta: dict, commands: list[dict]) -> list[str]:
    machine = meta["machine"]
    source = machine["git_commit"] + (
        " with uncommitted changes" if machine["git_uncommitted_changes"] else ""
    )
    plural = "s" if settings.repetitions > 1 else ""
    extra = ", ".join(f"`{o}`" for o in meta["extra_overrides"]) or "none"
    lines = [
        f"- Command: `{meta['command']}`, {meta['minutes']:.0f} minutes in all.",
        f"- Machine: {_machine_line(machine)}.",
        f"- Source: commit {source}. Load average (1 min): "
        f"{meta['load_start']} at the start, {meta['load_end']} at the end.",
        f"- Data: {settings.num_images:,} generated JPEGs of 500x375 in "
        f"{settings.num_classes} classes, {meta['mean_file_kib']:.1f} KiB on "
        f"average (bench/data.py).",
        f"- Settings: {settings.image_size[0]}x{settings.image_size[1]} RGB, "
        f"{settings.epochs} epochs, batch 32, {settings.repetitions} "
        f"repetition{plural} with the contenders alternating; medians. Sweep "
        f"learning rates: {', '.join(map(str, settings.learning_rates))}. "
        f"Added pipeline overrides: {extra}.",
    ]
    if commands:
        lines.append(_contention_line(commands, machine["cpu_cores"] or 1))
    return lines


def _split_line(repro: dict) -> str:
    first, ref = repro["pipeline"][0], repro["reference"][0]
    sizes = first["split_sizes"]
    return (
        f"- Split sizes: pipeline train {sizes['train']}, val {sizes['val']}, "
        f"test {sizes['test']}; reference train {ref['num_train']}, val "
        f"{ref['num_val']}. Pipeline epoch times: {first['epoch_seconds_source']}."
    )


def render_section(
    results: dict, settings, meta: dict, commands: list[dict] | None = None
) -> str:
    """Render one run as a Markdown section of facts, table, details and values."""
    label = "full run"
    if settings.mode == "quick":
        label = "quick check, NOT benchmark figures"
    if meta["only"] != ["repro", "sweep", "preprocess"]:
        label += ", only " + ", ".join(meta["only"])
    rows, repro_summary, prep_summary = _rows(results, settings)

    lines = [f"### {meta['started']} ({label})", ""]
    lines += _fact_lines(settings, meta, commands or [])
    if results.get("repro"):
        lines.append(_split_line(results["repro"]))
    lines += ["", render_table(rows), ""]
    lines += _flop_lines(results, repro_summary, settings)
    if prep_summary:
        lines.append(
            f"- Also measured: the preprocess stage on "
            f"{settings.num_images * settings.memory_copies:,} images, "
            f"{prep_summary['stage_large_images_per_second']:.1f} images/s; the "
            "Pillow loop with JPEG draft mode (decoding at a reduced scale), "
            f"{prep_summary['pillow_draft_images_per_second']:.1f} images/s. "
            "One training epoch over the larger set streamed "
            f"{prep_summary['large_stream_bytes'] / 1024**2:,.0f} MiB of pixels."
        )
    lines += ["", "Every repetition:", "", *repetition_lines(results), ""]
    lines.append(f"Raw results and logs: `{meta['results_dir']}` (not in git).")
    return "\n".join(lines) + "\n"


def append_to_docs(section: str, docs_file: Path = DOCS_FILE) -> None:
    """Append a run's section to docs/benchmarks.md, creating the page if needed."""
    if not docs_file.is_file():
        docs_file.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DOCS_TEMPLATE, docs_file)
    text = docs_file.read_text(encoding="utf-8")
    if RUNS_HEADING not in text:
        text = text.rstrip("\n") + f"\n\n{RUNS_HEADING}\n"
    docs_file.write_text(text.rstrip("\n") + "\n\n" + section, encoding="utf-8")
