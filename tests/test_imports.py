"""Every stage and command but train starts without importing TensorFlow or MLflow."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "stage",
    ["download", "preprocess", "split", "evaluate", "config", "predict", "compare"],
)
def test_stage_does_not_import_tensorflow(stage: str) -> None:
    code = (
        f"import sys, stages.{stage}; "
        "heavy = [m for m in ('tensorflow', 'keras', 'mlflow') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True
    )
    assert result.returncode == 0, f"stages.{stage} imports {result.stdout.strip()}"
