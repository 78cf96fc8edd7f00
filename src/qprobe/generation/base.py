"""The back-end interface: k sampled completions per prompt, and a pool of requests in flight.

A back-end is the only place that generates text. `qprobe.generation.fake` is the
reference implementation; the real ones (llamacpp, transformers, openai, vllm) follow it.
Embeddings of prompt+completion are computed by an `Embedder` (`qprobe.features`).

Generation across requests:
A `GenRequest` asks for one completion per seed of one rendered prompt. A `Pool` accepts
requests (`submit`), advances all of them by one step (`step`, which returns the requests that
finished), and drops a request on `cancel`. Back-ends that can decode several prompts at once
(llama.cpp: `qprobe.generation.llamacpp_pool`) return their own pool from `Backend.pool()`; every
other back-end gets `SequentialPool`, which runs one request per step with `Backend.generate`.

`generate_many` drives a pool over an iterable of requests, pulling the next one only when the
pool has room, so a collection keeps every slot busy across prompts; `qprobe serve` drives the
same pool from its request queue. A pool is used from one thread.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from qprobe.core.config import config_from_dict, config_to_dict
from qprobe.core.types import Completion, Prompt
from qprobe.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled. `seed` is the run seed; each sample derives its own."""

    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature (0: greedy)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling: keep the top tokens of this total probability."})
    max_new_tokens: int = field(default=300, metadata={"help": "Most tokens per completion."})
    stop: tuple[str, ...] = field(default=(), metadata={"help": "Stop sequence (repeatable). Default: the task's."})
    seed: int = field(default=0, metadata={"help": "Run seed; each sample's seed derives from it."})

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"expected temperature >= 0, got {self.temperature}; use 0 for greedy")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"expected 0 < top_p <= 1, got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"expected max_new_tokens >= 1, got {self.max_new_tokens}")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingConfig:
        return config_from_dict(cls, data)


def sample_seed(run_seed: int, prompt_id: str, index: int) -> int:
    """A per-sample seed that depends only on (run seed, prompt, index): resumes reproduce."""
    import hashlib

    h = hashlib.sha256(f"{run_seed}\x00{prompt_id}\x00{index}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


class Backend(ABC):
    """Samples completions and embeds prompt+completion pairs."""

    name: str = ""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """Model identity for manifests and feature specs: at least `model` and `sha256`."""

    def render(self, prompt: Prompt) -> str:
        """The exact string the model continues (chat template applied where relevant)."""
        return prompt.text

    @abstractmethod
    def generate(self, text: str, sampling: SamplingConfig, seeds: list[int]) -> list[Completion]:
        """len(seeds) completions of the rendered prompt `text`, one per seed."""

    def pool(self) -> Pool:
        """Requests in flight across prompts (see `Pool`); one at a time by default."""
        return SequentialPool(self)

    def close(self) -> None:  # noqa: B027 (a no-op by default, on purpose)
        """Release the model."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class GenRequest:
    """len(seeds) completions of the rendered prompt `text`; `key` names it to its caller."""

    key: Hashable
    text: str
    sampling: SamplingConfig
    seeds: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ConfigError(f"expected at least one seed in request {self.key!r}, got none")


Finished = tuple[GenRequest, list[Completion]]


class Pool(ABC):
    """Requests in flight on one back-end. Completions come back in the order of the request's seeds."""

    @abstractmethod
    def submit(self, request: GenRequest) -> None:
        """Queue a request (keys must be unique among those not yet finished)."""

    @abstractmethod
    def cancel(self, key: Hashable) -> None:
        """Forget a queued or running request; its completions never come back."""

    @abstractmethod
    def has_room(self) -> bool:
        """Whether another request would start without waiting for a slot: submit one now."""

    @abstractmethod
    def busy(self) -> bool:
        """Whether any submitted request has not finished yet."""

    @abstractmethod
    def step(self) -> list[Finished]:
        """Advance every running request (starting queued ones where slots are free); the finished ones."""

    def close(self) -> None:  # noqa: B027 (nothing to free by default)
        """Free what the pool holds (the back-end stays open)."""


class SequentialPool(Pool):
    """One request per step through `Backend.generate`: the pool of back-ends without one of their own."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.queue: deque[GenRequest] = deque()

    def submit(self, request: GenRequest) -> None:
        self.queue.append(request)

    def cancel(self, key: Hashable) -> None:
        self.queue = deque(r for r in self.queue if r.key != key)

    def has_room(self) -> bool:
        return not self.queue

    def busy(self) -> bool:
        return bool(self.queue)

    def step(self) -> list[Finished]:
        if not self.queue:
            return []
        req = self.queue.popleft()
        comps = self.backend.generate(req.text, req.sampling, list(req.seeds))
        if len(comps) != len(req.seeds):
            raise ConfigError(f"expected {len(req.seeds)} completions for request {req.key!r}, got {len(comps)}")
        return [(req, list(comps))]


class BatchedPool(SequentialPool):
    """Up to `max_requests` queued requests per step through one multi-prompt call of the back-end,
    `generate_batch(texts, sampling, seeds)` (vLLM schedules them together on the GPU); requests
    with different sampling settings go in separate calls, oldest first."""

    def __init__(self, backend: Backend, max_requests: int = 64) -> None:
        if max_requests < 1:
            raise ConfigError(f"expected max_requests >= 1, got {max_requests}")
        super().__init__(backend)
        self.max_requests = int(max_requests)

    def has_room(self) -> bool:
        return len(self.queue) < self.max_requests

    def step(self) -> list[Finished]:
        if not self.queue:
            return []
        sampling = self.queue[0].sampling
        batch = [r for r in self.queue if r.sampling == sampling][: self.max_requests]
        self.queue = deque(r for r in self.queue if all(r is not b for b in batch))
        outs = self.backend.generate_batch([r.text for r in batch], sampling,  # type: ignore[attr-defined]
                                           [list(r.seeds) for r in batch])
        if len(outs) != len(batch) or any(len(o) != len(r.seeds) for o, r in zip(outs, batch, strict=False)):
            raise ConfigError(f"expected one list of completions per request and seed, got {[len(o) for o in outs]}")
        return [(r, list(o)) for r, o in zip(batch, outs, strict=True)]


def generate_many(backend: Backend, requests: Iterable[GenRequest]) -> Iterator[Finished]:
    """Every request's completions, as they finish (not necessarily in request order).

    `requests` is read lazily: the next one is taken only when the pool has room for it."""
    pool = backend.pool()
    todo = iter(requests)
    exhausted = False
    try:
        while True:
            while not exhausted and pool.has_room():
                try:
                    pool.submit(next(todo))
                except StopIteration:
                    exhausted = True
            if not pool.busy():
                return
            yield from pool.step()
    finally:
        pool.close()
