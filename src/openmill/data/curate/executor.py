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

    def filter_files(self, tasks: Sequence) -> int:
        """Phase 1: this process reads every file and hands chunks to the workers, a few in flight.

        Reading (decompress + JSON) runs at tens of MB/s, the filters at ~1-2 MB/s per core, so one
        reader keeps every worker busy, and a corpus that is one big file still uses all cores.
        Returns the number of records read.
        """
        from openmill.data.curate.shards import chunk_done, file_chunks, filter_chunk

        total = 0
        with _progress() as bar:
            tid = bar.add_task("curate: filter (records)", total=None)
            if self.workers == 1:
                for t in tasks:
                    for index, records in file_chunks(t):
                        if not chunk_done(t, index):
                            filter_chunk(t, index, records)
                        total += len(records)
                        bar.advance(tid, len(records))
                return total
            pool = self._pool()
            pending: set = set()

            def settle() -> None:
                nonlocal pending
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    bar.advance(tid, f.result())  # re-raises a worker's error here

            for t in tasks:
                for index, records in file_chunks(t):
                    total += len(records)
                    if chunk_done(t, index):
                        bar.advance(tid, len(records))
                        continue
                    pending.add(pool.submit(filter_chunk, t, index, records))
                    while len(pending) >= 2 * self.workers:  # bounds memory: chunks waiting in the queue
                        settle()
            while pending:
                settle()
        return total

    def _pool(self) -> ProcessPoolExecutor:
        if self.pool is None:
            import multiprocessing as mp

            # spawn: the parent may hold torch threads or a Ray client, which fork would copy half-alive
            self.pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
        return self.pool

    def run(self, fn: Callable, tasks: Sequence, label: str) -> list:
        """fn(task) for every task, submitted in order; results in task order."""
        if not tasks:
            return []
        order = range(len(tasks))
        results: list = [None] * len(tasks)
        with _progress() as bar:
            tid = bar.add_task(label, total=len(tasks))
            if self.workers == 1 or len(tasks) == 1:
                for i in order:
                    results[i] = fn(tasks[i])
                    bar.advance(tid)
                return results
            pool = self._pool()
            futures = {pool.submit(fn, tasks[i]): i for i in order}
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
