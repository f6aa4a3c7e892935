"""Pieces both generators share: output folder safety, the truth folder, quirks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from spine.core.io import save_table, save_text
from spine.core.paths import truth_dir


def prepare_out(out: Path) -> Path:
    """Create an empty output folder; replace it only if it was generated (its truth folder exists).

    A non-empty folder without a truth folder beside it may be a real download: refuse, naming it.
    """
    out = Path(out)
    truth = truth_dir(out)
    if out.exists() and any(out.iterdir()):
        if not truth.exists():
            raise FileExistsError(
                f"{out} is not empty and was not made by the generator (no {truth.name}/ beside it); "
                "it may hold real competition data. Choose another --out or remove it yourself."
            )
        shutil.rmtree(out)
    if truth.exists():
        shutil.rmtree(truth)
    out.mkdir(parents=True, exist_ok=True)
    truth.mkdir(parents=True, exist_ok=True)
    return out


def write_truth(out: Path, tables: dict[str, pd.DataFrame], summary: dict) -> Path:
    """Write the truth folder: one CSV per table and ``summary.json`` (prior and Bayes scores)."""
    truth = truth_dir(out)
    for name, df in tables.items():
        save_table(truth / f"{name}.csv", df)
    save_text(truth / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    return truth


def corrupt(path: Path) -> None:
    """Make a DICOM file unreadable the way broken downloads are: cut it short."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: min(len(data) // 3, 200)])
