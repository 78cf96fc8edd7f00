"""The worker thread that owns the back-end: a bounded queue in, the policy's picks out.

The back-end, its pool (`Backend.pool()`, `qprobe.generation.base`) and the probe's embedder are
used from this one thread only. The asyncio side calls `submit` (a full queue raises `QueueFull`:
a 429 with Retry-After) and awaits the job's future; the worker takes jobs while the pool has
room, steps the pool, scores each finished job's samples and picks, and resolves the future on the
event loop (`call_soon_threadsafe`). `cancel` (a client that went away) drops a queued job before
it starts, cancels it in the pool while it runs, or discards its result.

Seeds: sample j of a prompt is drawn with `sample_seed(seed, P, j)`, P = a hash of the rendered
prompt, j = 0 .. n*k-1 (pick i owns samples i*k .. i*k+k-1), and pick i is drawn with
`np.random.default_rng(sample_seed(seed, P + "/pick", i))`: the same request with the same seed
gets the same answer from a fresh server on the fake back-end, whatever else it serves meanwhile.
On llama.cpp the samples are the same when the request is decoded alone; next to other requests
llama.cpp's CPU kernels may round a batch differently (`qprobe.generation.llamacpp_pool`): in one
check, 7 of 8 answers served concurrently equalled the same requests served one at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np

from qprobe.core.types import Completion, Prompt
from qprobe.errors import QProbeError
from qprobe.generation.base import GenRequest, Pool, SamplingConfig, sample_seed
from qprobe.metrics import selection_probs
from qprobe.policy.agreement import consensus_scores
from qprobe.policy.select import Candidate, PolicyConfig, QProbePolicy
from qprobe.serve.protocol import RequestError

log = logging.getLogger("qprobe.serve")


class QueueFull(Exception):
    """No room in the queue; `retry_after` seconds is the server's guess of when there will be."""

    def __init__(self, size: int, retry_after: int) -> None:
        super().__init__(f"the queue is full ({size} requests waiting)")
        self.size, self.retry_after = size, retry_after


@dataclass
class Pick:
    """One answer: `index` among the `candidates` (the k samples with their Q and probability)."""

    index: int
    candidates: list[Candidate]

    @property
    def chosen(self) -> Candidate:
        return self.candidates[self.index]


@dataclass
class Answer:
    """A job's result: n picks; `prompt_tokens` counted once, `completion_tokens` over all n x k samples."""

    picks: list[Pick]
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Job:
    """One prompt of a request: n x k samples, then n picks."""

    prompt: Prompt
    n: int
    k: int
    beta: float
    sampling: SamplingConfig
    future: asyncio.Future[Answer]
    loop: asyncio.AbstractEventLoop
    key: Hashable = None
    cancelled: bool = False
    started: float = 0.0
    text: str = ""
    prompt_tokens: int = 0


@dataclass
class EngineStats:
    """Counters shown by /health (and read by the tests)."""

    accepted: int = 0
    rejected_full: int = 0
    finished: int = 0
    failed: int = 0
    cancelled_queued: int = 0  # dropped before reaching the pool
    cancelled_in_pool: int = 0  # `Pool.cancel` called while it ran
    discarded: int = 0  # finished after its client had gone
    sampled_tokens: int = 0
    in_flight: int = 0


class Engine:
    """The policy over one back-end, served from a worker thread (`start` / `stop`)."""

    def __init__(self, backend: Any, probe: Any, *, consensus: float = 0.0, queue_size: int = 64) -> None:
        if queue_size < 1:
            raise RequestError(f"expected a queue of at least 1 request, got {queue_size}")
        self.backend = backend
        self.queue_size = queue_size
        self.policy = QProbePolicy(backend, probe, PolicyConfig(consensus=consensus))
        self.stats = EngineStats()
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self._cancels: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._running: dict[Hashable, Job] = {}
        self._keys = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warm = False
        self._service = 0.0  # moving average of a job's seconds in the pool (for Retry-After)

    def warm_up(self) -> None:
        """Before any request: the embedder prepares for the probe's feature (`Embedder.prepare`:
        llama.cpp picks the layers to capture, which it refuses to change under running sequences),
        then one 1-token sample of a short prompt goes through a pool of its own, the embedder and the
        probe, so that a probe that does not fit the back-end's features fails here, at start-up,
        not on the first request. Called by `start` unless done before."""
        self.policy.embedder.prepare([self.policy.request])
        text = self.backend.render(Prompt(id="warm-up", text="Hello", messages=({"role": "user", "content": "Hello"},)))
        pool = self.backend.pool()
        try:
            pool.submit(GenRequest("warm-up", text, SamplingConfig(max_new_tokens=1), (0,)))
            done: list[Completion] = []
            while pool.busy():
                for _, comps in pool.step():
                    done = comps
        finally:
            pool.close()
        self.picks(text, done, 1, 1, 0.0, 0)
        self._warm = True

    # ------------------------------------------------------------------ the asyncio side
    def start(self) -> None:
        """Start the worker thread (warming up first, in this thread, unless `warm_up` ran)."""
        if not self._warm:
            self.warm_up()
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="qprobe-serve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        """Queue `job`; raises QueueFull when the queue is at its size."""
        job.key = next(self._keys)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.stats.rejected_full += 1
            waiting = self._queue.qsize()
            raise QueueFull(waiting, self.retry_after(waiting)) from None
        self.stats.accepted += 1

    def cancel(self, job: Job) -> None:
        """The client went away: its work stops where it is (thread-safe)."""
        if not job.cancelled:
            job.cancelled = True
            self._cancels.put(job)

    def retry_after(self, waiting: int) -> int:
        """Seconds until the queue has room, guessed from the mean time a job spends in the pool."""
        return max(1, min(60, math.ceil(self._service * max(1, waiting) / 2)))

    def queued(self) -> int:
        return self._queue.qsize()

    # ------------------------------------------------------------------ the worker thread
    def _run(self) -> None:
        pool = self.backend.pool()
        try:
            while not self._stop.is_set():
                self._apply_cancels(pool)
                while pool.has_room():
                    job = self._take(block=not pool.busy())
                    if job is None:
                        break
                    self._start(pool, job)
                if not pool.busy():
                    continue
                try:
                    finished = pool.step()
                except Exception as exc:  # the back-end failed: fail what ran, start a fresh pool
                    log.exception("the back-end failed while generating")
                    for job in list(self._running.values()):
                        self._fail(job, exc)
                    self._running.clear()
                    pool.close()
                    pool = self.backend.pool()
                    continue
                for req, comps in finished:
                    job = self._running.pop(req.key, None)
                    if job is not None:
                        self._finish(job, comps)
                self.stats.in_flight = len(self._running)
        finally:
            pool.close()
            gone = RequestError("the server is shutting down; retry on another server", status=503, type="server_error")
            for job in list(self._running.values()):
                self._resolve(job, None, gone)
            while True:
                try:
                    self._resolve(self._queue.get_nowait(), None, gone)
                except queue.Empty:
                    break

    def _take(self, block: bool) -> Job | None:
        while True:
            try:
                job = self._queue.get(timeout=0.05) if block else self._queue.get_nowait()
            except queue.Empty:
                return None
            if not job.cancelled:
                return job
            self.stats.cancelled_queued += 1

    def _apply_cancels(self, pool: Pool) -> None:
        while True:
            try:
                job = self._cancels.get_nowait()
            except queue.Empty:
                return
            if self._running.pop(job.key, None) is not None:
                pool.cancel(job.key)
                self.stats.cancelled_in_pool += 1
                self.stats.in_flight = len(self._running)

    def _start(self, pool: Pool, job: Job) -> None:
        try:
            job.text = self.backend.render(job.prompt)
        except QProbeError as exc:  # e.g. a chat request to a model without a chat template
            self._fail(job, RequestError(f"expected a prompt this back-end can render, got: {exc}"))
            return
        try:
            job.prompt_tokens = prompt_token_count(self.backend, job.text)
            pid = hashlib.sha256(job.text.encode("utf-8")).hexdigest()[:16]
            seeds = tuple(sample_seed(job.sampling.seed, pid, j) for j in range(job.n * job.k))
            job.started = time.perf_counter()
            pool.submit(GenRequest(job.key, job.text, job.sampling, seeds))
        except Exception as exc:
            self._fail(job, exc)
            return
        self._running[job.key] = job
        self.stats.in_flight = len(self._running)

    def _finish(self, job: Job, comps: list[Completion]) -> None:
        took = time.perf_counter() - job.started
        self._service = 0.8 * self._service + 0.2 * took if self._service else took
        tokens = sum(c.n_tokens for c in comps)
        self.stats.sampled_tokens += tokens
        if job.cancelled:
            self.stats.discarded += 1
            return
        try:
            picks = self.picks(job.text, comps, job.n, job.k, job.beta, job.sampling.seed)
        except Exception as exc:
            self._fail(job, exc)
            return
        self.stats.finished += 1
        self._resolve(job, Answer(picks, job.prompt_tokens, tokens), None)

    def picks(self, text: str, comps: list[Completion], n: int, k: int, beta: float, seed: int) -> list[Pick]:
        """n picks, pick i among samples i*k .. i*k+k-1: softmax(Q/beta) (Sec. 4.1) drawn with its own seed."""
        q_all = self.policy._scores(text, comps)  # [n*k]
        pid = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        out = []
        for i in range(n):
            group = comps[i * k:(i + 1) * k]
            q = consensus_scores(q_all[i * k:(i + 1) * k], [c.text for c in group], self.policy.config.consensus)  # [k]
            p = selection_probs(q, beta)  # [k]
            index = int(np.random.default_rng(sample_seed(seed, pid + "/pick", i)).choice(k, p=p))
            out.append(Pick(index, [Candidate(c.text, float(s), float(pi), c.n_tokens, c.finish_reason)
                                    for c, s, pi in zip(group, q, p, strict=True)]))
        return out

    def _fail(self, job: Job, exc: BaseException) -> None:
        self.stats.failed += 1
        if isinstance(exc, RequestError):
            error = exc
        else:  # the server's fault (a back-end error, a probe that does not fit the features): logged, a 500
            log.error("request failed: %s: %s", type(exc).__name__, exc)
            error = RequestError(f"the server failed: {type(exc).__name__}: {str(exc)[:300]}", status=500,
                                 type="server_error")
        self._resolve(job, None, error)

    def _resolve(self, job: Job, answer: Answer | None, error: RequestError | None) -> None:
        if job.cancelled:  # its client has gone: nobody awaits the future
            return

        def settle() -> None:
            if job.future.done():
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(answer)  # type: ignore[arg-type]

        try:
            job.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            pass


def prompt_token_count(backend: Any, text: str) -> int:
    """Tokens of the rendered prompt with the back-end's tokenizer; whitespace words where it has none
    (the fake back-end, whose completions' tokens are words too)."""
    if callable(getattr(backend, "prompt_tokens", None)):
        return len(backend.prompt_tokens(text))
    encode = getattr(getattr(backend, "tokenizer", None), "encode", None)
    if callable(encode):
        return len(encode(text))
    return len(text.split())
