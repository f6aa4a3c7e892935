"""A process pool over independent items (series, studies), or a plain loop for one worker."""

from __future__ import annotations

import os
from multiprocessing import get_context


def resolve_workers(n: int) -> int:
    """``num_workers`` from a config: 0 means all cores."""
    return int(n) or os.cpu_count() or 1


class worker_pool:
    """``with worker_pool(n, n_tasks) as run: for result in run(fn, items): ...`` (unordered results).

    ``fn`` must be a module-level function (it is pickled to the workers). One worker, or one task,
    runs in this process, which keeps tracebacks and debuggers simple.
    """

    def __init__(self, workers: int, n_tasks: int):
        self.workers = max(1, min(workers, n_tasks))
        self.chunksize = max(1, n_tasks // (self.workers * 16))  # fewer round trips for many small tasks
        self.pool = None

    def __enter__(self):
        if self.workers > 1:
            self.pool = get_context("fork" if os.name == "posix" else "spawn").Pool(self.workers)
            return lambda fn, items: self.pool.imap_unordered(fn, items, chunksize=self.chunksize)
        return lambda fn, items: map(fn, items)

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.close() if exc[0] is None else self.pool.terminate()
            self.pool.join()
