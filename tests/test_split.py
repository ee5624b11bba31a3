"""Stage split: stratified, seeded, stable and leak-free assignment."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest

from stages.split import split
from stages.splitting import assign_splits, check_disjoint

FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


def make_index(counts: dict[str, int], start: int = 0) -> pd.DataFrame:
    rows = []
    for label, count in counts.items():
        for i in range(start, start + count):
            sha = hashlib.sha256(f"{label}/{i}".encode()).hexdigest()
            rows.append({"file": f"{label}/{i}.png", "label": label, "sha256": sha})
    return pd.DataFrame(rows)


def test_split_same_seed_same_assignment() -> None:
    index = make_index({"a": 200, "b": 200})
    first = assign_splits(index, FRACTIONS, seed=1)
    again = assign_splits(index, FRACTIONS, seed=1)
    other = assign_splits(index, FRACTIONS, seed=2)
    assert first.equals(again)
    assert not first.equals(other)


def test_split_is_stratified() -> None:
    index = make_index({"a": 400, "b": 400, "c": 400})
    assigned = assign_splits(index, FRACTIONS, seed=0)
    table = pd.crosstab(index["label"], assigned, normalize="index")
    for name, fraction in FRACTIONS.items():
        assert table[name].between(fraction - 0.06, fraction + 0.06).all(), table


def test_split_stable_when_images_added() -> None:
    index = make_index({"a": 100, "b": 100})
    before = assign_splits(index, FRACTIONS, seed=3)
    grown = pd.concat([index, make_index({"a": 50, "b": 50}, start=1000)])
    after = assign_splits(grown.reset_index(drop=True), FRACTIONS, seed=3)
    assert (after[: len(index)].to_numpy() == before.to_numpy()).all()


def test_split_duplicates_share_split() -> None:
    index = make_index({"a": 50, "b": 50})
    copies = index.iloc[:20].assign(file=lambda d: "copy_" + d["file"])
    index = pd.concat([index, copies], ignore_index=True)
    assigned = assign_splits(index, FRACTIONS, seed=0)
    check_disjoint(index, assigned)
    assert assigned.groupby(index["sha256"]).nunique().max() == 1


def test_split_small_class_gets_every_split() -> None:
    index = make_index({"big": 100, "small": 3})
    for seed in range(20):
        assigned = assign_splits(index, FRACTIONS, seed=seed)
        small = set(assigned[index["label"] == "small"])
        assert small == {"train", "val", "test"}, seed


def test_split_zero_val_fraction() -> None:
    index = make_index({"a": 30, "b": 30})
    assigned = assign_splits(index, {"train": 0.8, "val": 0.0, "test": 0.2}, seed=0)
    assert "val" not in set(assigned)


def test_split_stage_writes_manifests(digits_project: Path, monkeypatch) -> None:
    monkeypatch.chdir(digits_project)
    out = digits_project / "data/split"
    manifests = {n: pd.read_csv(out / f"{n}.csv") for n in ("train", "val", "test")}
    sizes = {n: len(m) for n, m in manifests.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["train"] > sizes["val"] > 0
    hashes = [set(m["sha256"]) for m in manifests.values()]
    assert not (hashes[0] & hashes[1] or hashes[0] & hashes[2] or hashes[1] & hashes[2])
    distribution = pd.read_csv(digits_project / "metrics/class_distribution.csv")
    assert list(distribution.columns) == ["label", "train", "val", "test"]
    assert distribution[["train", "val", "test"]].to_numpy().sum() == 1797
    assert (digits_project / "plots/class_distribution.png").stat().st_size > 1000


def test_split_stage_missing_index(project: Path) -> None:
    from stages.cli import InputError

    with pytest.raises(InputError, match="run the preprocess stage first"):
        split([])


def test_split_stage_rejects_bad_fractions(project: Path) -> None:
    from stages.config import ConfigError

    with pytest.raises(ConfigError, match="must sum to 1"):
        split(["split.train=0.8"])


def test_split_reports_class_too_small(caplog) -> None:
    from stages.splitting import missing_splits

    index = make_index({"big": 100, "pair": 2})
    assigned = assign_splits(index, FRACTIONS, seed=0)
    missing = missing_splits(index, assigned, FRACTIONS)
    assert missing == {"pair": ["val"]}
    assert set(assigned[index["label"] == "pair"]) == {"train", "test"}


def conflicting_index(folder: Path) -> Path:
    """Write an index where a/0.png also appears, identical, as b/dup.png."""
    index = make_index({"a": 30, "b": 30})
    first = index.iloc[0]
    extra = [
        {"file": "b/dup.png", "label": "b", "sha256": first["sha256"]},
        {"file": "a/copy.png", "label": "a", "sha256": index.iloc[1]["sha256"]},
    ]
    index = pd.concat([index, pd.DataFrame(extra)], ignore_index=True)
    folder.mkdir(parents=True)
    index.to_csv(folder / "index.csv", index=False)
    return folder


def run_split(project: Path, processed: Path, *overrides: str) -> dict[str, int]:
    return split(
        list(overrides),
        processed_dir=processed,
        output=project / "out/split",
        distribution_file=project / "out/distribution.csv",
        distribution_plot=project / "out/distribution.png",
    )


def manifest_files(project: Path) -> set[str]:
    return {
        file
        for name in ("train", "val", "test")
        for file in pd.read_csv(project / f"out/split/{name}.csv")["file"]
    }


def test_split_drops_label_conflicts_by_default(project: Path, caplog) -> None:
    processed = conflicting_index(project / "processed")
    counts = run_split(project, processed)

    files = manifest_files(project)
    assert "a/0.png" not in files
    assert "b/dup.png" not in files
    assert "a/1.png" in files
    assert "a/copy.png" in files
    assert sum(counts.values()) == 60
    table = pd.read_csv(project / "out/split/label_conflicts.csv")
    assert sorted(table["file"]) == ["a/0.png", "b/dup.png"]
    distribution = pd.read_csv(project / "out/distribution.csv")
    assert distribution[["train", "val", "test"]].to_numpy().sum() == 60
    assert "'a/0.png' ('a') and 'b/dup.png' ('b')" in caplog.text
    assert "left out of every split" in caplog.text


def test_split_keeps_or_fails_on_label_conflicts(project: Path) -> None:
    from stages.cli import InputError

    processed = conflicting_index(project / "processed")
    counts = run_split(project, processed, "split.label_conflicts=keep")
    assert sum(counts.values()) == 62
    assert {"a/0.png", "b/dup.png"} <= manifest_files(project)

    with pytest.raises(InputError, match=r"2 images in 1 groups .* split\.label"):
        run_split(project, processed, "split.label_conflicts=fail")
