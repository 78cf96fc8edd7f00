"""Generation across requests: a pool that takes requests while it decodes others.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qprobe.core.types import Completion
from qprobe.errors import ConfigError

if TYPE_CHECKING:  # base imports this module at run time
    from qprobe.generation.base import Backend, SamplingConfig


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
