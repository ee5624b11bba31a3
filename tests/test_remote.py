"""A DVC remote: push the pipeline's data and model, pull them into an empty cache."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from tests.services import reproduced_repo, run, stages_run

# The outputs that DVC caches (the metrics and plots are kept in git).
CACHED_OUTPUTS = ("data/raw", "data/processed", "data/split", "models/model.keras")


def digest(path: Path) -> str:
    """Return a digest of a file, or of every file's name and content in a folder."""
    files = (
        sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    )
    hashed = hashlib.sha256()
    for file in files:
        hashed.update(str(file.relative_to(path.parent)).encode())
        hashed.update(file.read_bytes())
    return hashed.hexdigest()


def test_remote_pull_restores_without_rerun(tmp_path_factory) -> None:
    repo = reproduced_repo(tmp_path_factory, "remote")
    remote = repo.parent / "remote"
    run(["dvc", "remote", "add", "-d", "store", str(remote)], repo)
    pushed = run(["dvc", "push"], repo)
    assert "pushed" in pushed.stdout + pushed.stderr
    assert any(path.is_file() for path in remote.rglob("*"))

    before = {name: digest(repo / name) for name in CACHED_OUTPUTS}
    shutil.rmtree(repo / ".dvc" / "cache")
    for name in CACHED_OUTPUTS:
        path = repo / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    missing = run(["dvc", "status"], repo).stdout
    assert "deleted:" in missing

    run(["dvc", "pull"], repo)
    for name in CACHED_OUTPUTS:
        assert (repo / name).exists(), name
        assert digest(repo / name) == before[name], name
    again = run(["dvc", "repro"], repo)
    output = again.stdout + again.stderr
    assert stages_run(output) == []
    assert "Data and pipelines are up to date" in output
