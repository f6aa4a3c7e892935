"""Synthetic studies in the exact Kaggle layouts, with a known best-possible answer. Each task's
generator is its ``generate`` runner; this package holds what they share (output folder, truth files,
the DICOM writer)."""

from __future__ import annotations

from pathlib import Path

from spine.registry import TASKS, get_task


def generate(task: str, out: Path, n_train: int, n_test: int, seed: int, **kwargs) -> dict:
    """Write a synthetic dataset of ``task`` in its Kaggle layout to ``out`` (truth beside it)."""
    return get_task(task).runner("generate")(Path(out), n_train, n_test, seed, **kwargs)


def generator_tasks() -> list[str]:
    """The registered tasks that have a generator."""
    return sorted(name for name in TASKS if "generate" in get_task(name).runners)
