"""Command image-compare: list the MLflow runs of an experiment side by side.

Reads: the MLflow store and experiment of params.yaml's tracking section,
unless --tracking-uri and --experiment name others. Writes: a table of runs
with chosen params and metrics to stdout, and optionally a CSV file and a
plot of one metric against a param.

    image-compare --sort val_accuracy --limit 5
    image-compare --plot lr.png --x train.learning_rate --y test_accuracy
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from stages.cli import InputError, setup_logging
from stages.config import ConfigError, load_params
from stages.fsutil import atomic_file

log = logging.getLogger("stages.compare")

DEFAULT_PARAMS = [
    "model.name",
    "train.optimizer",
    "train.learning_rate",
    "train.batch_size",
    "train.epochs",
]
DEFAULT_METRICS = ["test_accuracy", "val_accuracy", "val_loss"]
DEFAULT_X = "train.learning_rate"
RUN_COLUMNS = ["run_id", "run_name", "status", "start_time"]
KINDS = {"params": "param", "metrics": "metric"}
SHORT_ID_LENGTH = 8
LOG_SCALE_RATIO = 10  # x values spanning more than this factor use a log axis
PAGE_SIZE = 1000


def positive_int(text: str) -> int:
    """Parse a command-line integer that must be at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {value}; must be at least 1")
    return value


def require_store(uri: str) -> None:
    """Raise InputError when a SQLite tracking URI names a file that does not exist.

    MLflow would otherwise create an empty store there and report no runs.
    """
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///").split("?")[0])
    if str(path) != ":memory:" and not path.is_file():
        raise InputError(
            f"MLflow store {path} not found; train a model first (`dvc repro`) "
            "or pass --tracking-uri"
        )


def resolve_store(tracking_uri: str | None, experiment: str | None) -> tuple[str, str]:
    """Return the tracking URI and experiment name, taking defaults from params.yaml."""
    if tracking_uri and experiment:
        return tracking_uri, experiment
    from stages import tracking

    cfg = load_params(["tracking"]).tracking
    return tracking_uri or tracking.tracking_uri(cfg), experiment or cfg.experiment_name


def find_experiment(client, name: str, uri: str) -> str:
    """Return the id of experiment `name`, or raise InputError listing the others."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    names = sorted(e.name for e in client.search_experiments())
    existing = ", ".join(names) if names else "none"
    raise InputError(
        f"Experiment '{name}' not found in {uri}; existing experiments: "
        f"{existing}. Pass one with --experiment NAME"
    )


def fetch_runs(client, experiment_id: str) -> list:
    """Return every active run of the experiment, page by page."""
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], max_results=PAGE_SIZE, page_token=token
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def coerce_values(values: pd.Series) -> pd.Series:
    """Convert logged param text to numbers when every value is a number.

    The training run logs None as "null", which becomes a missing value.
    """
    values = values.where(values != "null", None)
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.notna().sum() == values.notna().sum():
        return numbers
    return values


def runs_frame(runs: list) -> pd.DataFrame:
    """Tabulate runs: one row each, with `params.<key>` and `metrics.<key>` columns."""
    if not runs:
        return pd.DataFrame(columns=RUN_COLUMNS)
    rows = []
    for run in runs:
        rows.append(
            {
                "run_id": run.info.run_id,
                "run_name": run.info.run_name,
                "status": run.info.status,
                "start_time": run.info.start_time,
                **{f"params.{k}": v for k, v in run.data.params.items()},
                **{f"metrics.{k}": v for k, v in run.data.metrics.items()},
            }
        )
    frame = pd.DataFrame(rows)
    frame["start_time"] = pd.to_datetime(frame["start_time"], unit="ms", utc=True)
    frame["start_time"] = frame["start_time"].dt.floor("s")
    for column in frame.columns:
        if column.startswith("params."):
            frame[column] = coerce_values(frame[column])
    return frame


def names_of(frame: pd.DataFrame, kind: str) -> list[str]:
    """Return the sorted param or metric names (`kind` "params" or "metrics")."""
    prefix = f"{kind}."
    return sorted(c.removeprefix(prefix) for c in frame.columns if c.startswith(prefix))


def unknown_name_error(
    frame: pd.DataFrame, name: str, kinds: tuple[str, ...], experiment: str
) -> InputError:
    """Build the error for a name that no run has, listing the available names."""
    kind_words = " or ".join(KINDS[kind] for kind in kinds)
    lines = [f"No run of experiment '{experiment}' has a {kind_words} named '{name}'"]
    for kind in KINDS:
        available = names_of(frame, kind)
        if kind not in kinds and name in available:
            lines[0] += f"; it is a {KINDS[kind]}, so pass it to --{kind}"
        close = difflib.get_close_matches(name, available, n=1)
        if kind in kinds and close:
            lines[0] += f" (did you mean '{close[0]}'?)"
        if kind in kinds:
            lines.append(f"available {kind}: {', '.join(available) or 'none'}")
    return InputError("\n  ".join(lines))


def find_column(
    frame: pd.DataFrame, name: str, kinds: tuple[str, ...], experiment: str
) -> str:
    """Return the column of param or metric `name`, searching `kinds` in order."""
    for kind in kinds:
        if f"{kind}.{name}" in frame.columns:
            return f"{kind}.{name}"
    raise unknown_name_error(frame, name, kinds, experiment)


def choose_columns(
    frame: pd.DataFrame,
    names: list[str] | None,
    kind: str,
    defaults: list[str],
    experiment: str,
) -> list[str]:
    """Return the columns of the requested names, or of the defaults that exist.

    Raises:
        InputError: a requested name is missing from every run. A missing
            default is left out with an info message instead.
    """
    if names is not None:
        return [find_column(frame, name, (kind,), experiment) for name in names]
    columns = [f"{kind}.{name}" for name in defaults]
    left_out = [name for name in defaults if f"{kind}.{name}" not in frame.columns]
    if left_out:
        listed = ", ".join(left_out)
        log.info("No run logged the %s %s, so the table leaves them out", kind, listed)
    return [c for c in columns if c in frame.columns]


def sort_column(
    frame: pd.DataFrame, sort: str | None, metric_columns: list[str], experiment: str
) -> str:
    """Return the column to sort by: `sort`, else the first metric, else start_time."""
    if sort is None:
        return metric_columns[0] if metric_columns else "start_time"
    if sort in RUN_COLUMNS:
        return sort
    return find_column(frame, sort, ("metrics", "params"), experiment)


def needs_log_scale(values: pd.Series) -> bool:
    """Tell whether numbers are all positive and span more than LOG_SCALE_RATIO."""
    return bool((values > 0).all() and values.max() > LOG_SCALE_RATIO * values.min())


def _scatter_numeric(axes, x: pd.Series, y: pd.Series) -> None:
    axes.scatter(x, y, alpha=0.8)
    if needs_log_scale(x):
        axes.set_xscale("log")


def _strip_categorical(axes, x: pd.Series, y: pd.Series) -> None:
    """Draw a box per category with each run as a jittered point over it."""
    categories = sorted(x.astype(str).unique())
    positions = {category: i for i, category in enumerate(categories)}
    groups = [y[x.astype(str) == category] for category in categories]
    axes.boxplot(groups, positions=range(len(categories)), widths=0.5, showfliers=False)
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(x))
    axes.scatter(x.astype(str).map(positions) + jitter, y, alpha=0.8, zorder=3)
    axes.set_xticks(range(len(categories)), labels=categories)
    if len(categories) > 5:
        axes.tick_params(axis="x", labelrotation=30)


def plot_runs(frame: pd.DataFrame, x_column: str, y_column: str, target: Path) -> int:
    """Save a plot of y against x over the runs that have both; return the run count.

    A numeric x gives a scatter plot, on a log axis when every value is
    positive and they span more than LOG_SCALE_RATIO. Any other x gives a box
    and jittered points per category.

    Raises:
        InputError: no run has both values, or y is not numeric.
    """
    from matplotlib.figure import Figure

    x_name = x_column.split(".", 1)[1]
    y_name = y_column.split(".", 1)[1]
    data = frame[[x_column, y_column]].dropna()
    if data.empty:
        raise InputError(f"No listed run has both {x_name} and {y_name} to plot")
    if not pd.api.types.is_numeric_dtype(data[y_column]):
        raise InputError(f"--y {y_name} is not numeric; pass a numeric metric")

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    if pd.api.types.is_numeric_dtype(data[x_column]):
        _scatter_numeric(axes, data[x_column], data[y_column])
    else:
        _strip_categorical(axes, data[x_column], data[y_column])
    runs = f"{len(data)} run" if len(data) == 1 else f"{len(data)} runs"
    axes.set_title(f"{y_name} against {x_name} ({runs})")
    axes.set_xlabel(x_name)
    axes.set_ylabel(y_name)
    axes.grid(alpha=0.3)
    with atomic_file(target) as tmp:
        figure.savefig(tmp, dpi=100)
    return len(data)


def format_table(table: pd.DataFrame) -> str:
    """Render the runs table as aligned text with short run ids."""
    printable = table.copy()
    printable["run_id"] = printable["run_id"].str[:SHORT_ID_LENGTH]
    return printable.to_string(
        index=False, na_rep="", float_format=lambda v: f"{v:.4g}"
    )


def load_runs(
    tracking_uri: str | None, experiment: str | None
) -> tuple[pd.DataFrame, str]:
    """Load every run of the experiment as a frame; see `runs_frame`.

    Raises:
        InputError: the store or the experiment does not exist, or it has no runs.
    """
    uri, experiment = resolve_store(tracking_uri, experiment)
    require_store(uri)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment_id = find_experiment(client, experiment, uri)
    frame = runs_frame(fetch_runs(client, experiment_id))
    if frame.empty:
        raise InputError(
            f"Experiment '{experiment}' in {uri} has no runs; train a model first "
            "(`dvc repro` or `python -m stages.train`)"
        )
    log.info("Found %d runs in experiment '%s' of %s", len(frame), experiment, uri)
    return frame, experiment


def compare_runs(
    experiment: str | None = None,
    tracking_uri: str | None = None,
    params: list[str] | None = None,
    metrics: list[str] | None = None,
    sort: str | None = None,
    ascending: bool = False,
    limit: int | None = None,
    output: Path | None = None,
    plot: Path | None = None,
    x: str = DEFAULT_X,
    y: str | None = None,
) -> pd.DataFrame:
    """List the runs of an experiment with chosen params and metrics.

    Args:
        experiment: experiment name (default: tracking.experiment_name).
        tracking_uri: MLflow store (default: as `stages.tracking.tracking_uri`
            resolves it from params.yaml).
        params: param columns (default: the DEFAULT_PARAMS that any run has).
        metrics: metric columns (default: the DEFAULT_METRICS that any run has).
        sort: metric, param or run column to sort by (default: the first
            metric column, else start_time). Missing values go last.
        ascending: sort smallest first instead of largest first.
        limit: keep only the first `limit` runs after sorting.
        output: CSV file for the table, with full run ids.
        plot: image file for a plot of `y` against `x` over the listed runs.
        x: param or metric on the plot's x-axis.
        y: metric on the plot's y-axis (default: the first metric column).

    Returns:
        The table: run_id, run_name, status, start_time (UTC), then the
        params and metrics under their own names.
    """
    frame, experiment = load_runs(tracking_uri, experiment)
    param_columns = choose_columns(frame, params, "params", DEFAULT_PARAMS, experiment)
    metric_columns = choose_columns(
        frame, metrics, "metrics", DEFAULT_METRICS, experiment
    )
    key = sort_column(frame, sort, metric_columns, experiment)
    plot_columns = None
    if plot is not None:
        plot_columns = _plot_columns(frame, x, y, metric_columns, experiment)

    ordered = frame.sort_values(
        key, ascending=ascending, na_position="last", kind="stable"
    )
    ordered = ordered.head(limit) if limit else ordered
    table = ordered[RUN_COLUMNS + param_columns + metric_columns]
    table = table.rename(columns=lambda c: c.split(".", 1)[1] if "." in c else c)
    order = "ascending" if ascending else "descending"
    key_name = key.split(".", 1)[-1]
    log.info("Listing %d of %d runs by %s, %s", len(table), len(frame), key_name, order)

    if plot_columns is not None:
        count = plot_runs(ordered, *plot_columns, plot)
        log.info("Saved the plot of %d runs to %s", count, plot)
    if output is not None:
        with atomic_file(output) as tmp:
            table.to_csv(tmp, index=False)
        log.info("Wrote %s", output)
    return table.reset_index(drop=True)


def _plot_columns(
    frame: pd.DataFrame,
    x: str,
    y: str | None,
    metric_columns: list[str],
    experiment: str,
) -> tuple[str, str]:
    if y is None and not metric_columns:
        raise InputError("No metric to plot; pass --y METRIC")
    x_column = find_column(frame, x, ("params", "metrics"), experiment)
    if y is None:
        return x_column, metric_columns[0]
    return x_column, find_column(frame, y, ("metrics", "params"), experiment)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line of image-compare."""
    parser = argparse.ArgumentParser(
        prog="image-compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--experiment",
        metavar="NAME",
        help="experiment name (default: tracking.experiment_name in params.yaml)",
    )
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else tracking.uri "
        "in params.yaml, else mlflow.db in the project folder)",
    )

    parser.add_argument(
        "--params",
        nargs="*",
        metavar="NAME",
        help=f"param columns (default: {' '.join(DEFAULT_PARAMS)})",
    )
    parser.add_argument(
        "--metrics",
        nargs="*",
        metavar="NAME",
        help="metric columns, each run's last logged value "
        f"(default: {' '.join(DEFAULT_METRICS)})",
    )
    parser.add_argument(
        "--sort",
        metavar="NAME",
        help="metric, param or run column to sort by (default: the first metric)",
    )
    parser.add_argument("--ascending", action="store_true", help="sort smallest first")
    parser.add_argument(
        "--limit", type=positive_int, metavar="N", help="list only the first N runs"
    )

    parser.add_argument(
        "--output", type=Path, metavar="FILE.csv", help="also write the table as CSV"
    )

    parser.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="save a plot of --y against --x over the listed runs",
    )
    parser.add_argument(
        "--x",
        default=DEFAULT_X,
        metavar="NAME",
        help=f"param or metric on the x-axis (default: {DEFAULT_X})",
    )
    parser.add_argument(
        "--y", metavar="NAME", help="metric on the y-axis (default: the first metric)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run image-compare; configuration and input errors exit with status 2."""
    args = parse_args(argv)
    setup_logging()
    try:
        table = compare_runs(
            experiment=args.experiment,
            tracking_uri=args.tracking_uri,
            params=args.params,
            metrics=args.metrics,
            sort=args.sort,
            ascending=args.ascending,
            limit=args.limit,
            output=args.output,
            plot=args.plot,
            x=args.x,
            y=args.y,
        )
    except (ConfigError, InputError) as error:
        log.error("%s", error)
        sys.exit(2)
    print(format_table(table))


if __name__ == "__main__":
    main()
