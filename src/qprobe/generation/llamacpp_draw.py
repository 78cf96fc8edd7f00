"""Drawing a decode step's tokens on llama.cpp: each row's sampler chain, the rows in threads.

`RowDrawer.draw` does what llama.cpp's `llama_sampler_sample` does (every vocabulary token a
candidate with its logit, the chain applied, its pick accepted), with the rows of one step spread
over the back-end's threads. The chains are independent sampler states and ctypes calls release
the GIL, so the tokens are those of a sequential loop (tests/test_llamacpp_pool.py checks it), in
about half the time on 2 cores: a sampler chain over the 151k-token vocabulary takes 2-3 ms a row
here, about 12% of a collection's time (benchmarks/profile_collect.py).
"""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from qprobe.errors import BackendError

_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data


class RowDrawer:
    """Draws the next token of (sampler chain, row of the last decode) pairs of one context."""

    def __init__(self, lib: Any, vocab: Any, n_threads: int) -> None:
        self.lib, self.n_threads = lib, int(n_threads)
        self.n_vocab = int(lib.llama_vocab_n_tokens(vocab))
        self.ids = np.arange(self.n_vocab, dtype="<i4")
        self.own = ctypes.sizeof(lib.llama_token_data) == _TOKEN_DATA.itemsize  # else llama_sampler_sample
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()  # a candidates buffer a thread

    def draw(self, ctx: Any, picks: list[tuple[Any, int]]) -> list[int]:
        if not picks:
            return []
        lib = self.lib
        if not self.own:  # a llama_token_data layout this code does not know
            return [int(lib.llama_sampler_sample(smp, ctx, row)) for smp, row in picks]
        logits = [lib.llama_get_logits_ith(ctx, row) for _, row in picks]  # in this thread
        if self.n_threads < 2 or len(picks) < 2:
            return [self._one(smp, ptr) for (smp, _), ptr in zip(picks, logits, strict=True)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.n_threads, thread_name_prefix="qprobe-sampler")
        return list(self._pool.map(self._one, [smp for smp, _ in picks], logits))

    def _one(self, smp: Any, logits_ptr: Any) -> int:
        lib, n = self.lib, self.n_vocab
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = np.empty(n, _TOKEN_DATA)
        buf["id"] = self.ids
        buf["logit"] = np.ctypeslib.as_array(logits_ptr, shape=(n,))
        buf["p"] = 0.0
        cur = lib.llama_token_data_array(buf.ctypes.data_as(lib.llama_token_data_p), n, -1, False)
        lib.llama_sampler_apply(smp, ctypes.byref(cur))
        if not 0 <= cur.selected < cur.size:
            raise BackendError(f"expected the sampler chain to select a candidate, got index {cur.selected}")
        tok = int(cur.data[cur.selected].id)  # a sampler may point `data` at its own sorted buffer
        lib.llama_sampler_accept(smp, tok)
        return tok

    @property
    def threaded(self) -> bool:
        return self._pool is not None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
