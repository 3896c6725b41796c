"""The model's one worker thread and the bounded queue in front of it.

The model is not thread-safe and decodes one sequence at a time, so one thread owns it and runs jobs in
order; HTTP threads submit Jobs and read their events. Every job's prompt is evaluated with reuse=True:
the KV cache keeps the longest prefix shared with the previous request, so the next turn of a
conversation evaluates only its new tokens.
"""
from __future__ import annotations

import queue
import sys
import threading
import time

from lazymoe.runtime.generate import stream_generate
from lazymoe.serve.openai_api import ApiError, Request

END = None                      # a Job's last event


class Busy(Exception):
    """The queue is full."""


class Job:
    """A Request on its way through the worker. events: "started", then Steps, then END; or an ApiError
    then END. client_gone() is polled after every token (a disconnected client stops its generation)."""

    def __init__(self, req: Request, client_gone=lambda: False):
        self.req, self.client_gone = req, client_gone
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def stopped(self) -> bool:
        return self.cancelled.is_set() or self.client_gone()


class Engine:
    """submit(job) queues a Job (Busy when `queue_size` jobs already wait); one thread runs them."""

    def __init__(self, model, queue_size: int):
        self.model = model
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self.stopping = threading.Event()
        self.job_s = 1.0                 # running mean of a job's seconds: the Retry-After estimate
        self.running: Job | None = None
        self.thread = threading.Thread(target=self._loop, name="lazymoe-model", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        if self.stopping.is_set():
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise Busy() from None

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free (whole seconds, as the Retry-After header wants)."""
        return max(1, min(60, round(self.job_s)))

    def waiting(self) -> int:
        return self.jobs.qsize()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse queued jobs, stop the running one at its next token, and end the thread."""
        self.stopping.set()
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not END:
                job.events.put(ApiError(503, "the server is shutting down", code="shutting_down"))
                job.events.put(END)
        running = self.running
        if running is not None:
            running.cancel()
        self.jobs.put(END)
        self.thread.join(timeout)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is END:
                return
            if self.stopping.is_set():
                job.events.put(ApiError(503, "the server is shutting down", code="shutting_down"))
            if self.stopping.is_set() or job.stopped():
                job.events.put(END)
                continue
            self.running = job
            t0 = time.perf_counter()
            try:
                self._run(job)
            finally:
                self.running = None
                job.events.put(END)
            self.job_s = 0.8 * self.job_s + 0.2 * (time.perf_counter() - t0)

    def _run(self, job: Job) -> None:
        req = job.req
        try:
            steps = stream_generate(self.model, req.ids, req.sampler, req.max_tokens, req.stop, reuse=True)
        except ValueError as e:
            job.events.put(ApiError(400, str(e), code="invalid_value"))
            return
        job.events.put("started")
        finished = False
        try:
            for step in steps:
                job.events.put(step)
                finished = step.finish_reason is not None
                if not finished and (job.stopped() or self.stopping.is_set()):
                    break
        except Exception as e:  # a failure inside the model must not end the worker: the client gets a 500
            print(f"lazymoe serve: error: generation failed: {type(e).__name__}: {e}", file=sys.stderr)
            job.events.put(ApiError(500, f"generation failed: {type(e).__name__}", code="internal_error"))
        finally:
            steps.close()
            if self.stopping.is_set() and not finished:
                job.events.put(ApiError(503, "the server is shutting down", code="shutting_down"))
