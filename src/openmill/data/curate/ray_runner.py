"""Ray executor: the same shard jobs as remote tasks on a Ray cluster (or Ray's local mode).

Dedup stays global: phase 1 tasks write band keys per shard, the driver gathers them all, so a
duplicate pair split across shards (and nodes) is found exactly as in a local run. Outputs are
written by the tasks into the run directory, which must be shared storage on a real cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from openmill.data.curate.executor import _progress


class RayExecutor:
    def __init__(self, address: str | None, workers: int):
        try:
            import ray
        except ImportError:
            raise RuntimeError("curate.executor: ray needs the ray package (pip install ray)") from None
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            kwargs = {"address": address} if address else {"num_cpus": workers or None}
            ray.init(include_dashboard=False, log_to_driver=False, **kwargs)
            self.started = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.started:
            self.ray.shutdown()

    def filter_files(self, tasks: Sequence) -> int:
        """Phase 1: one task per input file; each node reads its own files."""
        from openmill.data.curate.shards import filter_file

        return sum(self.run(filter_file, tasks, "curate: filter (files)"))

    def run(self, fn: Callable, tasks: Sequence, label: str) -> list:
        if not tasks:
            return []
        remote = self.ray.remote(fn)
        refs = [remote.remote(t) for t in tasks]
        index = {r: i for i, r in enumerate(refs)}
        results: list = [None] * len(tasks)
        pending = list(refs)
        with _progress() as bar:
            tid = bar.add_task(label, total=len(tasks))
            while pending:
                done, pending = self.ray.wait(pending, num_returns=1)
                for r in done:
                    results[index[r]] = self.ray.get(r)  # re-raises the task's error
                    bar.advance(tid)
        return results
