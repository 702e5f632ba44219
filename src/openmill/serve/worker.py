"""One thread owns the engine; requests from any number of HTTP handlers meet in its batch.

Continuous batching: between two decode steps the worker admits every waiting request for which a
row is free (prefilling it into that row), so a request never waits for the others to finish,
and all active requests share each step's forward. Results go back to each request's asyncio
queue as events: ("delta", text), then ("done", finish_reason, prompt_tokens, completion_tokens)
or ("error", message). Every job submitted gets its "done" or "error", also one waiting or in
flight when the worker is closed (or its thread dies) and one submitted after: its handler waits
for one of the two.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field

from openmill.generate import Engine, SamplingParams

WORKER_STOPPED = "the server's generation worker has stopped (shutting down, or failed); retry on a running server"


@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams
    stop_ids: tuple[int, ...]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # the client went away: free its row at the next step

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # its event loop is closed: nobody is listening, and the worker goes on
            pass


class BatchWorker:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.jobs: dict[int, Job] = {}  # engine row -> job
        self.steps = 0  # batched decode forwards, and the rows they carried (for the tests)
        self.rows_decoded = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()  # makes "closed" and the last drain of `waiting` one step for submit
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="openmill-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closed:
                job.emit("error", WORKER_STOPPED)
                return
            self.waiting.put(job)

    def close(self) -> None:
        """Stop after the current step; the thread then answers every remaining job with an error."""
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            self._serve()
        finally:  # closed, or an unexpected error: no step will answer these jobs any more
            self._fail_remaining_jobs()

    def _fail_remaining_jobs(self) -> None:
        with self._lock:
            self._closed = True
            jobs = list(self.jobs.values())
            self.jobs.clear()
            while True:
                try:
                    jobs.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
        for job in jobs:
            job.emit("error", WORKER_STOPPED)

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.engine.active:
                try:  # idle: block until a request arrives
                    self._admit(self.waiting.get(timeout=0.1))
                except queue.Empty:
                    continue
            while self.engine.free_rows:
                try:
                    self._admit(self.waiting.get_nowait())
                except queue.Empty:
                    break
            for seq in self.engine.active:
                job = self.jobs.get(seq.row)
                # A row no job owns answers nobody: left in, it costs every step (or fails it, if it
                # never got a first token).
                if job is None or job.cancelled:
                    self.engine.cancel(seq)
                    self.jobs.pop(seq.row, None)
            if not self.engine.active:
                continue
            try:
                advanced = self.engine.step()
            except Exception as e:  # noqa: BLE001 (report to every client in the batch, keep serving)
                for job in self.jobs.values():
                    job.emit("error", f"generation failed: {e}")
                self.jobs.clear()
                # Free every row, owned or not: one left behind would fail the same way next step.
                for seq in self.engine.active:
                    self.engine.cancel(seq)
                continue
            self.steps += 1
            self.rows_decoded += len(advanced)
            for seq in advanced:
                self._report(seq, self.jobs[seq.row])

    def _admit(self, job: Job) -> None:
        if job.cancelled:  # its client left while it waited
            return
        try:
            seq = self.engine.add(job.prompt, job.params, job.stop_ids)
        except Exception as e:  # noqa: BLE001 (one bad request must not stop the worker)
            job.emit("error", str(e))
            return
        self.jobs[seq.row] = job
        self._report(seq, job)

    def _report(self, seq, job: Job) -> None:
        if seq.delta:
            job.emit("delta", seq.delta)
        if seq.done:
            job.emit("done", seq.finish_reason, len(seq.prompt), len(seq.tokens))
            self.jobs.pop(seq.row, None)
