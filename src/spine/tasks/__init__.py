"""Task registry: one module per competition, found by name."""

from __future__ import annotations

from .base import Task
from .cervical import CervicalTask
from .lumbar import LumbarTask

TASKS: dict[str, type[Task]] = {"lumbar": LumbarTask, "cervical": CervicalTask}


def get_task(name: str) -> Task:
    """The task object registered under ``name``; a clear error lists the known ones."""
    try:
        return TASKS[name]()
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None
