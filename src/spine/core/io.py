"""Atomic writes: a reader never sees a partial file, an interrupted run leaves none."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def save_table(path: Path, df: pd.DataFrame) -> None:
    """Write a DataFrame as .parquet or .csv (by suffix), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)


def save_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def fingerprint(*parts) -> str:
    """A short hash of JSON-able parts (config sections, file contents): what an output was made from."""
    import hashlib
    import json

    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _key_file(path: Path) -> Path:
    return Path(str(path) + ".key")


def is_current(path: Path, key: str) -> bool:
    """True when ``path`` exists and was made from ``key`` (see ``mark_current``)."""
    return Path(path).exists() and _key_file(path).exists() and _key_file(path).read_text() == key


def mark_current(path: Path, key: str) -> None:
    """Record that ``path`` was made from ``key``; write it after ``path`` itself."""
    save_text(_key_file(path), key)


def claim(path: Path, key: str) -> None:
    """Before making ``path`` from ``key``: delete what was made from other inputs (the file and its
    ``.last`` resume state), so nothing stale is reused, then record ``key``. A half-made output of the
    same inputs is kept, so an interrupted run resumes."""
    key_file = _key_file(path)
    if not (key_file.exists() and key_file.read_text() == key):
        for f in (Path(path), Path(str(path) + ".last")):
            f.unlink(missing_ok=True)
    mark_current(path, key)
