"""The model's one worker thread and the bounded queue in front of it.

The model is not thread-safe and decodes one sequence at a time, so one thread owns it and runs jobs in
order; HTTP threads submit Jobs and read their events. Every job's prompt is evaluated with reuse=True:
the KV cache keeps the longest prefix shared with the previous request, so the next turn of a
conversation evaluates only its new tokens.

A chat's next turn comes back as text, and re-tokenizing the previous reply rarely gives the ids that
were generated (sampled tokens are often not the canonical split), which would end the shared prefix at
the reply's first difference. So the worker remembers the text of the last prompt plus its reply with
their ids, and a prompt that starts with that text, followed by a control piece ("</s>", "<|im_end|>"),
is tokenized as those ids plus the rest: the same text, and the cache holds all of it.
"""
from __future__ import annotations

import queue
import sys
import threading
import time

from lazymoe.format.tokens import CONTROL, NORMAL
from lazymoe.runtime.generate import stream_generate
from lazymoe.serve.openai_api import ApiError, Request

END = None                      # a Job's last event


def _whole_text(s: str) -> bool:
    return bool(s) and "\ufffd" not in s and not s[0].isspace()


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
        tok = model.tokenizer
        self.controls = tuple(p for p, t in zip(tok.pieces, tok.types) if t == CONTROL and p)
        self.anchor = next((i for i, (p, t) in enumerate(zip(tok.pieces, tok.types))   # a piece with whole
                            if t == NORMAL and p and not p.startswith("\u2581")            # characters of text,
                            and _whole_text(tok.decode([i]))), None)                       # no leading space
        self.previous: tuple[str, list[int]] | None = None    # (prompt text + reply text, their ids)
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
        try:
            self.jobs.put(END, timeout=1.0)
        except queue.Full:              # jobs that raced past the stopping check: the loop refuses them, then ends
            pass
        self.thread.join(timeout)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is END:
                return
            if self.stopping.is_set():
                job.events.put(ApiError(503, "the server is shutting down", code="shutting_down"))
                job.events.put(END)
                if self.jobs.empty():
                    return
                continue
            if job.stopped():
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

    def _continuation(self, ids) -> str:
        """ids decoded as text that follows other text (a text's first piece loses its leading space)."""
        d = self.model.tokenizer.stream()
        d.feed(self.anchor)
        return "".join(d.feed(i) for i in ids) + d.flush()

    def _splice(self, req: Request) -> None:
        """Give req the previous generation's own ids for the part of its text they spell (module doc)."""
        prev, self.previous = self.previous, None
        if not req.text or prev is None or self.anchor is None or not req.text.startswith(prev[0]):
            return
        rest = req.text[len(prev[0]):]
        if not rest.startswith(self.controls):             # else the tokenizer would put a space before rest
            return
        ids = prev[1] + self.model.tokenizer.encode(rest, bos=False, special=True)
        if len(ids) + req.max_tokens <= self.model.ctx:
            req.ids = ids

    def _run(self, job: Job) -> None:
        req = job.req
        self._splice(req)
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
                if step.finish_reason in ("eos", "length") and req.text and self.anchor is not None:
                    self.previous = (req.text + self._continuation(step.token_ids), req.ids + list(step.token_ids))
                if not finished and (job.stopped() or self.stopping.is_set()):
                    break
        except Exception as e:  # a failure inside the model must not end the worker: the client gets a 500
            print(f"lazymoe serve: error: generation failed: {type(e).__name__}: {e}", file=sys.stderr)
            job.events.put(ApiError(500, f"generation failed: {type(e).__name__}", code="internal_error"))
        finally:
            steps.close()
            if self.stopping.is_set() and not finished:
                job.events.put(ApiError(503, "the server is shutting down", code="shutting_down"))
