"""Synthetic studies in the exact Kaggle layouts, with a known best-possible answer."""

from __future__ import annotations

import importlib
from pathlib import Path

GENERATORS = {"lumbar": "spine.synth.lumbar", "cervical": "spine.synth.cervical"}


def generate(task: str, out: Path, n_train: int, n_test: int, seed: int, **kwargs) -> dict:
    """Write a synthetic dataset of ``task`` in its Kaggle layout to ``out`` (truth beside it)."""
    if task not in GENERATORS:
        raise ValueError(f"no generator for task {task!r}; known: {sorted(GENERATORS)}")
    return importlib.import_module(GENERATORS[task]).generate(Path(out), n_train, n_test, seed, **kwargs)
