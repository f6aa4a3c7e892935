"""Task registry: one package per competition, found by name. Adding a task is one line here.

Each entry names the task class as "module:Class"; it is imported on first use, so a stage loads only
the task it runs, and ``spine.core`` never imports a task package.
"""

from __future__ import annotations

import importlib

from spine.core.task import Task

TASKS: dict[str, str] = {
    "lumbar": "spine.lumbar.task:LumbarTask",
    "cervical": "spine.cervical.task:CervicalTask",
    "scoliosis": "spine.scoliosis.task:ScoliosisTask",
    "spider": "spine.spider.task:SpiderTask",
}


def get_task(name: str) -> Task:
    """The task object registered under ``name``; a clear error lists the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)()
