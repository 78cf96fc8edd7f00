"""Continuous batching on llama.cpp: S sequence slots shared by all requests in flight.

Each slot is one llama.cpp sequence (seq id = slot index): a KV stream of its own
(`kv_unified=False`, the back-end's default) or a part of one unified cache. A step:
1. admit: free slots (lowest ids first, so a step's sequences stay consecutive and llama.cpp
   computes them as one ubatch) take the seeds of queued requests, oldest request first. A
   request's first slots evaluate all its prompt tokens but the last once, into one of them (in
   chunks of at most batch_size tokens, no outputs, a decode of their own), and that one's cells
   are copied to the others (`llama_memory_seq_cp`: a whole stream, or by reference in a unified
   cache); a slot admitted later, while a sibling still runs, copies the sibling's cells and
   drops all but the prompt's; if no sibling is left the prompt is evaluated again.
   Prompt heads are shared across requests (`share_prefix`, on by default): before a request's
   prompt is evaluated, the longest head of tokens it shares with a prompt in flight (a chat
   template's system turn and instructions: 26 of about 89 tokens of an MBPP chat prompt) is
   copied from that prompt's slot the same way, and only the rest is evaluated. On this CPU a
   prompt token costs about as much as a decoded one, so this is compute saved, not only latency.
2. decode: one `llama_batch` with one row per running slot, in slot order (its last sampled
   token, or the last prompt token for a new slot), every row an output: logits and, when the
   embedder asked for them (`backend.capture_states`, and no LoRA adapter is on), the states of
   every fed token, per sequence.
3. sample: each slot's own sampler chain draws its next token from its row (`backend.sample`:
   the rows spread over the back-end's threads); an end-of-generation
   token, a stop sequence or max_new_tokens ends the slot, whose cells are then dropped.
A request finishes when all its seeds have; its completions come back in seed order.

KV budget: a stream holds n_ctx / n_seq_max cells, and a request whose prompt + max_new_tokens
does not fit one is refused at submit. In a unified cache a request is admitted only while
n_prompt + (max_new_tokens + 1) per slot, summed over what runs, fits n_ctx, so no decode can
run out of cells.

Determinism: the schedule (which rows share a batch at every step) is a function of the
ordered requests, their seeds and (S, n_ctx, batch_size), so the same command gives the same
texts. The same seed decoded next to other requests (a resumed collection, another S, a
server's traffic) can give another text where llama.cpp's CPU kernels round a batch
differently (benchmarks/bench_batching.py measures how often). Shared heads are part of the
schedule: a head's cells were computed in another prompt's prefill, which can round them
differently from a prefill of this prompt alone, so texts can differ from those of
`share_prefix=False` (or of qprobe before it), as they can with another S. A kept tail (a stop
sequence cut inside a token) has its states decoded as rows of the running batch, so those
features can differ in their last digits from a decode of the tail alone; texts do not depend on
it. `backend.sample` draws a step's rows in threads, chain by chain: the same tokens as drawing
them one after another.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qprobe.core.types import Completion
from qprobe.errors import BackendError
from qprobe.generation.base import Finished, GenRequest, Pool
from qprobe.generation.llamacpp_text import find_stop


@dataclass
class _Job:
    req: GenRequest
    tokens: list[int]
    waiting: deque[int]  # indices into req.seeds not yet given a slot
    done: list[Completion | None]
    slots: set[int] = field(default_factory=set)  # running slots
    prompt_states: dict[int, np.ndarray] | None = None


@dataclass
class _Slot:
    job: _Job
    index: int  # which seed of the job
    sampler: Any
    feed: tuple[int, int] | None  # (token, position) to decode next
    gen: list[int] = field(default_factory=list)
    raw: bytearray = field(default_factory=bytearray)
    states: dict[int, list[np.ndarray]] = field(default_factory=dict)
    finish: str | None = None
    cut: int | None = None
    prefill: bool = False  # its row is the job's last prompt token
    row: int = 0
    tail: deque[tuple[int, int]] | None = None  # kept tokens still to feed for their states (then it ends)


class LlamaCppPool(Pool):
    """Up to `slots` sequences of one `LlamaCppBackend` in flight, across requests."""

    def __init__(self, backend: Any, slots: int | None = None, share_prefix: bool = True) -> None:  # a LlamaCppBackend
        self.b = backend
        self.share_prefix = bool(share_prefix)
        self.shared_tokens = self.prefilled_tokens = 0  # prompt positions copied from another prompt / evaluated
        self.tail_tokens = 0  # kept tokens re-fed after a stop cut inside a token, as rows of running steps
        self.n_slots = int(slots or backend.n_seq_max)
        if not 1 <= self.n_slots <= backend.n_seq_max:
            raise BackendError(f"expected 1 <= slots <= n_seq_max={backend.n_seq_max}, got {self.n_slots}")
        self.slots: list[_Slot | None] = [None] * self.n_slots
        self.queue: deque[_Job] = deque()
        self.jobs: dict[Hashable, _Job] = {}
        self.capture = backend.generation_captures()
        self.layers = (backend.n_layers, *backend.capture_layers)
        self.steps = 0
        backend._lib.llama_memory_clear(backend._memory(), True)

    # ----------------------------------------------------------------- the Pool contract
    def submit(self, request: GenRequest) -> None:
        if request.key in self.jobs:
            raise BackendError(f"expected a new request key, got {request.key!r} twice; keys must be unique")
        tokens = self.b.prompt_tokens(request.text)
        need = len(tokens) + request.sampling.max_new_tokens + 1
        if need > self.b.n_ctx_seq:
            raise BackendError(
                f"expected prompt + max_new_tokens < {self.b.n_ctx_seq} KV cells a sequence, got {len(tokens)} + "
                f"{request.sampling.max_new_tokens}; raise n_ctx (n_ctx / n_seq_max cells a sequence unless "
                "kv_unified=True) or lower max_new_tokens"
            )
        job = _Job(request, tokens, deque(range(len(request.seeds))), [None] * len(request.seeds))
        self.b.begin_prompt(request.text)
        self.jobs[request.key] = job
        self.queue.append(job)

    def cancel(self, key: Hashable) -> None:
        job = self.jobs.pop(key, None)
        if job is None:
            return
        if job in self.queue:
            self.queue.remove(job)
        for s in sorted(job.slots):
            self._free(s)
        self.b.live_texts[job.req.text] -= 1

    def has_room(self) -> bool:
        return sum(len(j.waiting) for j in self.queue) < self.n_slots

    def busy(self) -> bool:
        return bool(self.jobs)

    def step(self) -> list[Finished]:
        self._admit()
        running = [s for s, slot in enumerate(self.slots) if slot is not None and slot.feed is not None]
        if not running:
            if self.queue and not any(self.slots):
                raise BackendError("expected a queued request to fit the KV cache, got none; raise n_ctx")
            return self._finished()
        self.steps += 1
        b = self.b
        self.capture = b.generation_captures()  # the embedder may have changed its mind (then it re-evaluates)
        b.set_embeddings(self.capture)
        if b._layer_capture is not None:
            b._layer_capture.enabled = self.capture
        items = []
        for s in running:
            slot = self.slots[s]
            assert slot is not None and slot.feed is not None
            items.append((slot.feed[0], slot.feed[1], s, True))
        b.decode(items)  # every row an output; at most n_slots <= batch_size rows
        fed = b.states(len(items)) if self.capture else {}
        for j, s in enumerate(running):
            slot = self.slots[s]
            assert slot is not None
            slot.row = j
            if fed and not slot.prefill:
                for layer in self.layers:
                    slot.states[layer].append(fed[layer][j])
            if fed and slot.prefill and slot.job.prompt_states is None:
                slot.job.prompt_states = {layer: fed[layer][j] for layer in self.layers}
            slot.prefill = False
        order = sorted(running)
        drawing = [s for s in order if self._draws(s)]
        drawn = dict(zip(drawing, b.sample([(self.slots[s].sampler, self.slots[s].row) for s in drawing]),  # type: ignore[union-attr]
                         strict=True))
        ended = [s for s in order if self._advance(s, drawn.get(s))]  # every slot samples before any tail decode
        for s in ended:
            self._end(s)
        return self._finished()

    def close(self) -> None:
        for s in range(self.n_slots):
            self._free(s)
        for job in self.jobs.values():
            self.b.live_texts[job.req.text] -= 1
        self.jobs.clear()
        self.queue.clear()

    # ----------------------------------------------------------------- admission
    def _reserved(self) -> int:
        """KV cells that what runs may still take (a unified cache; streams are checked at submit)."""
        if not self.b.kv_unified:
            return 0
        jobs = {id(sl.job): sl.job for sl in self.slots if sl is not None}
        per_slot = sum(sl.job.req.sampling.max_new_tokens + 1 for sl in self.slots if sl is not None)
        return per_slot + sum(len(j.tokens) for j in jobs.values())

    def _admit(self) -> None:
        b, lib = self.b, self.b._lib
        free = [s for s, slot in enumerate(self.slots) if slot is None]
        room = b.n_ctx - self._reserved() if b.kv_unified else 1 << 60
        while free and self.queue:
            job = self.queue[0]
            per = job.req.sampling.max_new_tokens + 1
            fresh = not job.slots
            n = min(len(job.waiting), len(free), (room - (len(job.tokens) if fresh else 0)) // per)
            if n < 1:
                return  # wait for cells: oldest request first, no overtaking
            taken, free = free[:n], free[n:]
            room -= n * per + (len(job.tokens) if fresh else 0)
            new = [self._open(job, job.waiting.popleft(), s) for s in taken]
            mem, n = b._memory(), len(job.tokens)
            if fresh:  # evaluate the prompt into the first slot (after a shared head), copy its cells to the others
                src = taken[0]
                self._prefill(job.tokens, src, self._share_head(job, src))
            else:  # a running sibling holds the prompt
                src = min(job.slots - set(taken))
            for s in taken:
                if s != src:  # all of src's cells (a whole stream, or by reference), then only the prompt's
                    lib.llama_memory_seq_cp(mem, src, s, -1, -1)
                    lib.llama_memory_seq_rm(mem, s, n - 1, -1)
            for slot in new:  # each feeds the last prompt token itself (its logits are needed now)
                slot.feed, slot.prefill = (job.tokens[-1], n - 1), True
            if not job.waiting:
                self.queue.popleft()

    def _open(self, job: _Job, index: int, s: int) -> _Slot:
        slot = _Slot(job, index, self.b._sampler(job.req.sampling, job.req.seeds[index]), None,
                     states={layer: [] for layer in self.layers})
        self.slots[s] = slot
        job.slots.add(s)
        self.b.in_flight += 1
        return slot

    def _share_head(self, job: _Job, seq: int) -> int:
        """Copy into `seq` the cells of the longest prompt head `job` shares with another prompt in
        flight (a chat template's system turn and instructions); -> how many positions it holds.

        A slot holds at least its prompt's cells but the last one's, so the head is capped at the
        donor's prompt length - 1 and at `job`'s (whose last token is fed with the decode batch)."""
        if not self.share_prefix:
            return 0
        best, m = None, 0
        for s, slot in enumerate(self.slots):
            if slot is None or slot.job is job:
                continue
            other = slot.job.tokens
            cap = min(len(other), len(job.tokens)) - 1
            k = 0
            while k < cap and other[k] == job.tokens[k]:
                k += 1
            if k > m:
                best, m = s, k
        if best is None:
            return 0
        mem, lib = self.b._memory(), self.b._lib
        lib.llama_memory_seq_cp(mem, best, seq, -1, -1)  # a whole stream (or by reference), then the head only
        lib.llama_memory_seq_rm(mem, seq, m, -1)
        self.shared_tokens += m
        return m

    def _prefill(self, tokens: list[int], seq: int, start: int = 0) -> None:
        """Prompt tokens `start`.. but the last into `seq`, no outputs (the LM head does not run on them)."""
        b = self.b
        b.set_embeddings(False)
        if b._layer_capture is not None:
            b._layer_capture.enabled = False
        n = len(tokens) - 1
        self.prefilled_tokens += max(n - start, 0)
        for first in range(start, n, b.batch_size):
            b.decode([(tokens[p], p, seq, False) for p in range(first, min(n, first + b.batch_size))])

    # ----------------------------------------------------------------- sampling and finishing
    def _draws(self, s: int) -> bool:
        """Whether the slot draws a token from this step's row (not when it was fed for states only)."""
        slot = self.slots[s]
        return slot is not None and not slot.tail and slot.finish is None

    def _advance(self, s: int, tok: int | None) -> bool:
        """Take the token the slot drew from its row (None: it draws none, `_draws`); whether the
        slot has ended."""
        slot = self.slots[s]
        assert slot is not None
        b, sampling = self.b, slot.job.req.sampling
        if slot.tail:  # a kept tail fed with this step's batch, for its states only
            slot.feed = slot.tail.popleft()
            return False
        if slot.finish is not None:  # its last token (or its tail) was fed for its state only
            return True
        assert tok is not None
        if b.is_eog(tok):
            slot.finish = "stop"
            return True
        slot.gen.append(tok)
        slot.raw += b.piece(tok)
        if sampling.stop and (at := find_stop(slot.raw, sampling.stop)) is not None:
            slot.finish, slot.cut = "stop", at
            return True
        slot.feed = (tok, len(slot.job.tokens) + len(slot.gen) - 1)
        if len(slot.gen) >= sampling.max_new_tokens:
            slot.finish = "length"
            return not self.capture  # with features, its last token is fed once more for its state
        return False

    def _end(self, s: int) -> None:
        slot = self.slots[s]
        assert slot is not None
        job = slot.job
        body, ids = self.b._kept(slot.gen, slot.raw, slot.cut)
        if self.capture and slot.tail is None and self._queue_tail(s, slot, ids):
            return  # it ends once its tail is fed, with the next steps' batches
        if self.capture:
            if slot.tail is None:
                self._feed_tail(s, slot, ids)
            if len(slot.states[self.b.n_layers]) == len(ids):
                self.b._captured(job.req.text)[(job.req.seeds[slot.index], ids)] = {
                    layer: np.stack(rows) if ids else np.zeros((0, self.b.dim), np.float32)  # [t, d]
                    for layer, rows in slot.states.items()
                }
        job.done[slot.index] = Completion(text=body, n_tokens=len(ids), finish_reason=slot.finish or "length",
                                          seed=job.req.seeds[slot.index], token_ids=ids)
        self._free(s)

    def _kept_fed(self, slot: _Slot, ids: tuple[int, ...]) -> int:
        """How many of the kept tokens `ids` were fed as generated (their states are right); the
        states of the rest are dropped."""
        m = 0
        while m < min(len(ids), len(slot.gen), len(slot.states[self.b.n_layers])) and ids[m] == slot.gen[m]:
            m += 1
        for rows in slot.states.values():
            del rows[m:]
        return m

    def _queue_tail(self, s: int, slot: _Slot, ids: tuple[int, ...]) -> bool:
        """States for kept tokens never fed as generated (a stop sequence cut inside a token, and
        the kept text re-tokenised differently, e.g. `)\n` kept as `)`): drop the slot's cells
        from the first differing position and feed the kept tail there one token a step, as a row
        of the running batch (no decode of its own); -> whether a tail was queued. A tail longer
        than the cells the slot has used is left to `_feed_tail` (a unified cache reserved no more)."""
        m = self._kept_fed(slot, ids)
        if m >= len(ids):
            slot.tail = deque()
            return False
        n_prompt = len(slot.job.tokens)
        if len(ids) > len(slot.gen):
            return False
        self.b._lib.llama_memory_seq_rm(self.b._memory(), s, n_prompt + m, -1)
        slot.tail = deque((tok, n_prompt + m + j) for j, tok in enumerate(ids[m:]))
        self.tail_tokens += len(slot.tail)
        slot.feed = slot.tail.popleft()
        return True

    def _feed_tail(self, s: int, slot: _Slot, ids: tuple[int, ...]) -> None:
        """The tail of `_queue_tail` decoded at once, in a decode of this slot's own (this overwrites
        only logits already sampled from)."""
        n_prompt, states = len(slot.job.tokens), slot.states
        m = self._kept_fed(slot, ids)
        if m >= len(ids):
            return
        b = self.b
        b._lib.llama_memory_seq_rm(b._memory(), s, n_prompt + m, -1)
        try:
            for start in range(m, len(ids), b.batch_size):
                chunk = [(tok, n_prompt + start + j, s, True) for j, tok in enumerate(ids[start : start + b.batch_size])]
                b.set_embeddings(True)
                b.decode(chunk)
                got = b.states(len(chunk))
                for layer in self.layers:
                    states[layer].extend(got[layer])
        except BackendError:  # no room in the KV cache: the embedder evaluates these itself
            for rows in states.values():
                rows.clear()

    def _free(self, s: int) -> None:
        slot = self.slots[s]
        if slot is None:
            return
        self.b._lib.llama_sampler_free(slot.sampler)
        self.b._lib.llama_memory_seq_rm(self.b._memory(), s, -1, -1)
        slot.job.slots.discard(s)
        self.slots[s] = None
        self.b.in_flight -= 1

    def _finished(self) -> list[Finished]:
        out: list[Finished] = []
        for key, job in list(self.jobs.items()):
            if not job.waiting and not job.slots and all(c is not None for c in job.done):
                if job.prompt_states is not None:
                    self.b._captured(job.req.text)["prompt"] = job.prompt_states  # type: ignore[assignment]
                del self.jobs[key]
                self.b.live_texts[job.req.text] -= 1
                out.append((job.req, [c for c in job.done if c is not None]))
        return out
