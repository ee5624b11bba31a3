"""The MLflow UI in headless Chromium: runs, their comparison and an artifact."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tests.services import (
    MlflowServer,
    chromium,
    private_project,
    train_and_evaluate,
)

# Without these, Chromium contacts Google's services at start.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LEARNING_RATES = ("0.001", "0.003")
CONFUSION_MATRIX = "evaluation/confusion_matrix.png"


@pytest.fixture(scope="module")
def ui_runs(digits_project: Path, tmp_path_factory):
    """A project with two training runs (two learning rates), each evaluated."""
    folder = tmp_path_factory.mktemp("browser")
    project = private_project(digits_project, folder / "project")
    mlflow.set_tracking_uri(None)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        for rate in LEARNING_RATES:
            train_and_evaluate(
                folder / f"lr-{rate}",
                ["model=cnn_small", "train.epochs=1", f"train.learning_rate={rate}"],
                ["tracking.experiment_name=browser"],
            )
    mlflow.set_tracking_uri(None)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("browser")
    runs = client.search_runs([experiment.experiment_id], order_by=["start_time"])
    return project, experiment.experiment_id, runs


@pytest.fixture(scope="module")
def ui_server(ui_runs, tmp_path_factory):
    """An MLflow server on the project's SQLite store."""
    project = ui_runs[0]
    server = MlflowServer(
        f"sqlite:///{project / 'mlflow.db'}", tmp_path_factory.mktemp("ui-server")
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def page(tmp_path: Path):
    """A page of headless Chromium with a fresh profile; records every request."""
    from playwright.sync_api import sync_playwright

    executable = chromium()
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=executable,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 900},
        )
        context.set_default_timeout(90_000)
        page = context.new_page()
        page.requested = []
        page.on("request", lambda request: page.requested.append(request.url))
        yield page
        context.close()


def close_assistant(page) -> None:
    """Close the MLflow Assistant side panel, if shown, for clearer screenshots."""
    panel = page.get_by_text("MLflow Assistant")
    if panel.count():
        header = panel.first.locator("xpath=ancestor::div[.//button][1]")
        buttons = header.get_by_role("button")
        if buttons.count():
            buttons.last.click()


def test_browser_runs_compare_and_artifact(ui_runs, ui_server, page, tmp_path) -> None:
    _, experiment_id, runs = ui_runs
    base = ui_server.url

    page.goto(f"{base}/#/experiments/{experiment_id}/runs")
    for run in runs:
        page.get_by_text(run.info.run_name, exact=True).first.wait_for()
    close_assistant(page)
    page.screenshot(path=tmp_path / "runs.png")

    ids = [run.info.run_id for run in runs]
    query = f"runs={json.dumps(ids)}&experiments={json.dumps([experiment_id])}"
    page.goto(f"{base}/#/compare-runs?{query}")
    page.get_by_text("train.learning_rate", exact=True).first.wait_for()
    page.get_by_text("test_accuracy", exact=True).first.wait_for()
    text = page.inner_text("body")
    for name in ("model.name", "train.epochs", "learning_rate", "test_f1_macro"):
        assert name in text, name
    for rate in LEARNING_RATES:
        assert rate in text, rate
    for run in runs:
        assert run.info.run_id in text
        # The comparison shows metric values rounded to 3 decimals.
        assert str(round(run.data.metrics["test_accuracy"], 3)) in text
    parameters = page.locator("tr", has_text="train.learning_rate")
    assert LEARNING_RATES[0] in parameters.first.inner_text()
    parameters.first.scroll_into_view_if_needed()
    page.screenshot(path=tmp_path / "compare.png")

    run_id = runs[-1].info.run_id
    page.goto(
        f"{base}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/{CONFUSION_MATRIX}"
    )
    page.get_by_text(CONFUSION_MATRIX).first.wait_for()
    page.wait_for_function(
        "() => [...document.images].some(i => i.src.startsWith('blob:')"
        " && i.complete && i.naturalWidth > 100)"
    )
    page.screenshot(path=tmp_path / "artifact.png")
    fetched = [url for url in page.requested if "get-artifact" in url]
    assert any("confusion_matrix.png" in url for url in fetched), fetched

    outside = {
        urlparse(url).hostname
        for url in page.requested
        if urlparse(url).scheme in ("http", "https")
    } - {"127.0.0.1"}
    assert not outside
