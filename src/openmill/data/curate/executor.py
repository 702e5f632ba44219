"""Where shard jobs run: inline, a local process pool over all cores, or a Ray cluster.

Every executor runs the same plain functions (shards.py) on the same picklable tasks, so local
and Ray runs produce the same bytes. Jobs write their results to the run directory themselves
(on Ray, that directory must be on storage every node sees); executors only schedule, report
progress (rich) and re-raise the first error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )


class LocalExecutor:
    def __init__(self, workers: int):
        self.workers = workers or os.cpu_count() or 1
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def run(self, fn: Callable, tasks: Sequence, label: str, weights: Sequence[int] | None = None) -> list:
        """fn(task) for every task; results in task order. Heaviest first keeps all workers busy to the end."""
        if not tasks:
            return []
        order = sorted(range(len(tasks)), key=lambda i: -(weights[i] if weights else 0))
        results: list = [None] * len(tasks)
        with _progress() as bar:
            tid = bar.add_task(label, total=len(tasks))
            if self.workers == 1 or len(tasks) == 1:
                for i in order:
                    results[i] = fn(tasks[i])
                    bar.advance(tid)
                return results
            if self.pool is None:
                import multiprocessing as mp

                # spawn: the parent may hold torch threads or a Ray client, which fork would copy half-alive
                self.pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
            futures = {self.pool.submit(fn, tasks[i]): i for i in order}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    results[futures[f]] = f.result()  # re-raises a worker's error here
                    bar.advance(tid)
        return results


def make_executor(cfg):
    if cfg.executor == "ray":
        from openmill.data.curate.ray_runner import RayExecutor

        return RayExecutor(cfg.ray_address, cfg.workers)
    return LocalExecutor(cfg.workers)
