"""Every stage and command but train starts without importing TensorFlow or MLflow."""

from __future__ import annotations

import pytest

from tests.services import run_python


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
    result = run_python(code)
    assert result.returncode == 0, f"stages.{stage} imports {result.stdout.strip()}"


def test_train_config_error_before_tensorflow(project) -> None:
    code = (
        "import sys\n"
        "from stages.config import ConfigError\n"
        "from stages.train import train\n"
        "try:\n"
        "    train(['train.epochs=0'])\n"
        "except ConfigError as error:\n"
        "    print(error)\n"
        "sys.exit(1 if 'tensorflow' in sys.modules else 0)\n"
    )
    result = run_python(code, cwd=project)
    assert "train.epochs: invalid value 0" in result.stdout
    assert result.returncode == 0, "train imported TensorFlow before the error"


def test_keras_imports_without_optional_packages() -> None:
    code = (
        "import sys\n"
        "from stages.tfimport import import_keras\n"
        "keras = import_keras()\n"
        "skipped = [m for m in ('sklearn', 'matplotlib') if m in sys.modules]\n"
        "import sklearn.metrics, matplotlib.pyplot\n"
        "print(skipped, 'tensorflow' in sys.modules, keras.__name__)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "True", "keras"]
