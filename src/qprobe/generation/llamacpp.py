"""The llama.cpp back-end (llama-cpp-python's low-level API): batched sampling on a CPU.

Generation is continuous batching (`llamacpp_pool.LlamaCppPool`): up to n_seq_max sequences of a
unified KV cache decode together, one `llama_batch` per step, each with its own sampler chain
(temperature -> top_p -> dist(seed), or greedy at temperature 0), across prompts: the k samples
of a prompt share one prompt evaluation, and a new prompt's samples take the slots of finished
ones (`pool()`; `generate` is one prompt through the same pool). The context is created
with `embeddings=True, pooling NONE`, so every decode also returns the last layer's state
(after the final norm) of each token it feeds; `capture(layers)` adds any other layers, read
by llama.cpp's eval callback during the same decodes (`llamacpp_capture.LayerCapture`).
`LlamaCppEmbedder` reuses those states instead of evaluating prompt+completion again.

Determinism: the same requests in the same order (a `generate` call, or a whole collection)
give the same texts across restarts, because the batch composition at every step is a function
of them. The same seed decoded next to other sequences (another set of seeds, a resumed
collection, another n_seq_max) may round differently in llama.cpp's CPU kernels and give
another text (benchmarks/bench_batching.py measures how often).
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from qprobe.core.types import Completion
from qprobe.errors import BackendError, ConfigError
from qprobe.generation.base import Backend, GenRequest, Pool, SamplingConfig, SequentialPool
from qprobe.generation.llamacpp_capture import LayerCapture, resolve_layer
from qprobe.generation.llamacpp_draw import RowDrawer
from qprobe.generation.llamacpp_lib import default_threads, extra_buffers_default, load, set_verbose
from qprobe.generation.llamacpp_lora import LlamaLora
from qprobe.generation.llamacpp_pool import LlamaCppPool
from qprobe.generation.llamacpp_text import LlamaText
from qprobe.generation.models import file_sha256, model_name, resolve_model

BATCHING = ("continuous", "prompt")
KV_DTYPES = ("f16", "f32")  # the KV cache's element type: llama.cpp's default, or exact (tests)
CTX_PER_SEQ = 1024  # default KV cells a sequence (prompt + completion)
CAPTURED_PROMPTS = 4  # finished prompts whose generation-time states are kept for the embedder


class LlamaCppBackend(LlamaText, LlamaLora, Backend):
    """Samples from a GGUF model; `model`: None/'default', a known name, or a .gguf path.

    `n_seq_max` sequences at most decode together; `n_ctx` is the KV cache of them all (default
    `CTX_PER_SEQ` x n_seq_max). With `kv_unified=False` (the default) every sequence has a stream
    of n_ctx / n_seq_max cells of its own, so a token attends only to its own sequence's cells
    (a unified cache makes every token of a step attend over all the cells in use, masked, which
    costs more than the model itself once a few thousand cells are in use: benchmarks/RESULTS.md);
    a prompt is evaluated once and its cells copied to its siblings' streams. `kv_unified=True`
    shares the prompt's cells by reference in one cache of n_ctx cells. `batching="continuous"`
    keeps the sequences busy across prompts (`pool()`); `"prompt"` decodes one prompt's samples at
    a time, as qprobe did before continuous batching; `share_prefix=False` evaluates every prompt
    whole instead of copying the head it shares with a prompt in flight. `lora=PATH` samples with a GGUF LoRA adapter
    (scaled by `lora_scale`) on the generation context, the embedder's side context staying the
    base model (`set_lora` swaps it: qprobe.generation.llamacpp_lora). `kv_dtype="f32"` keeps the KV
    cache in F32 instead of llama.cpp's F16 (exact comparisons with transformers; more memory).
    """

    name = "llamacpp"

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        batch_size: int = 512,
        n_seq_max: int = 16,
        chat: bool = True,
        extra_buffers: bool | None = None,
        cache_dir: str | None = None,
        verbose: bool = False,
        batching: str = "continuous",
        kv_unified: bool = False,
        lora: str | os.PathLike[str] | None = None,
        lora_scale: float = 1.0,
        kv_dtype: str = "f16",
        share_prefix: bool = True,
    ) -> None:
        if batching not in BATCHING:
            raise ConfigError(f"expected batching in {list(BATCHING)}, got '{batching}'")
        if kv_dtype not in KV_DTYPES:
            raise ConfigError(f"expected kv_dtype in {list(KV_DTYPES)}, got '{kv_dtype}'")
        n_ctx = int(n_ctx) if n_ctx is not None else CTX_PER_SEQ * int(n_seq_max)
        if n_ctx < 64 or not 1 <= n_seq_max <= min(batch_size, 256):
            raise ConfigError(
                f"expected n_ctx >= 64 and 1 <= n_seq_max <= min(batch_size, 256), got n_ctx={n_ctx}, "
                f"n_seq_max={n_seq_max}, batch_size={batch_size}"
            )
        lib = load()
        if verbose:
            set_verbose(True)  # else QPROBE_VERBOSE (`qprobe --verbose`) decides
        self.path = resolve_model(model, cache_dir)
        self.chat = bool(chat)
        self.batching = batching
        self.share_prefix = bool(share_prefix)
        self.kv_unified = bool(kv_unified)
        self.kv_dtype = kv_dtype
        self.n_seq_max = int(n_seq_max)
        self.batch_size = int(batch_size)
        self.n_threads = int(n_threads or default_threads())
        # Set by LlamaCppEmbedder: keep the states of the tokens fed while generating, for the
        # last few prompts: {text: {"prompt": {layer: [d]}, (seed, token_ids): {layer: [t, d]}}},
        # layers as hidden_states indices 0..n_layers (n_layers: the last, after the final norm).
        self.capture_states = False
        self.captured: OrderedDict[str, dict[Any, dict[int, np.ndarray]]] = OrderedDict()
        self.capture_layers: tuple[int, ...] = ()  # intermediate layers read by the eval callback
        self.live_texts: Counter[str] = Counter()  # prompts of requests in flight (their states stay)
        self.in_flight = 0  # sequences running in pools (the context must not change under them)
        self._aside = False
        self._layer_capture: LayerCapture | None = None
        self._layer_rows: dict[int, np.ndarray] = {}  # captured rows of the last decode
        self._sha256: str | None = None
        self._lib = lib

        mparams = lib.llama_model_default_params()
        mparams.use_extra_bufts = extra_buffers_default() if extra_buffers is None else bool(extra_buffers)
        self._model = lib.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self._model:
            raise BackendError(f"expected a loadable GGUF model, got '{self.path}'; is the file complete?")
        self._vocab = lib.llama_model_get_vocab(self._model)
        self._drawer = RowDrawer(lib, self._vocab, self.n_threads)  # `sample`
        self.n_layers = int(lib.llama_model_n_layer(self._model))
        self.dim = int(lib.llama_model_n_embd(self._model))
        self._n_ctx_asked = int(n_ctx)
        self._side: tuple[Any, LayerCapture | None] | None = None  # a second context (`aside`)
        try:
            self._ctx, self._layer_capture = self._new_context(self.kv_unified)
        except BackendError:
            lib.llama_model_free(self._model)
            self._model = None
            raise
        self.n_ctx = int(lib.llama_n_ctx(self._ctx))
        # the cells one sequence may use: all of them (unified) or its own stream's
        self.n_ctx_seq = self.n_ctx if self.kv_unified else int(lib.llama_n_ctx_seq(self._ctx))
        self._batch = lib.llama_batch_init(self.batch_size, 0, 1)
        self._formatter: Any = None
        if lora is not None:
            try:
                self.set_lora(lora, lora_scale)
            except BaseException:
                self.close()
                raise

    def _new_context(self, unified: bool) -> tuple[Any, LayerCapture | None]:
        """A context on the loaded weights, with its own layer capture (None if no layers asked)."""
        lib = self._lib
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = self._n_ctx_asked
        cparams.n_batch = cparams.n_ubatch = self.batch_size
        cparams.n_seq_max = self.n_seq_max
        cparams.n_threads = cparams.n_threads_batch = self.n_threads
        cparams.kv_unified = unified
        cparams.type_k = cparams.type_v = lib.GGML_TYPE_F32 if self.kv_dtype == "f32" else lib.GGML_TYPE_F16
        # llama.cpp's CPU flash attention was slower here at every fill (benchmarks/RESULTS.md)
        cparams.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.embeddings = True  # states of fed tokens, together with the logits
        cparams.pooling_type = lib.LLAMA_POOLING_TYPE_NONE
        capture = None
        if self.capture_layers:
            capture = LayerCapture(list(self.capture_layers), self.n_layers)
            capture.install(cparams)  # kept alive by self, as long as the context
        ctx = lib.llama_init_from_model(self._model, cparams)
        if not ctx:
            raise BackendError(
                f"expected a llama.cpp context of {self._n_ctx_asked} tokens, could not create one; lower n_ctx"
            )
        return ctx, capture

    def capture(self, layers: Iterable[int]) -> None:
        """Read these layers (hidden_states numbering; the last comes with every decode anyway)
        inside llama.cpp from now on; a new set re-creates the context (the weights stay)."""
        wanted = tuple(sorted({resolve_layer(int(L), self.n_layers) for L in layers} - {self.n_layers}))
        if wanted == self.capture_layers:
            return
        if self.in_flight:
            raise BackendError(
                f"expected no sequences in flight to change the captured layers, got {self.in_flight}; "
                "ask for the layers before generating (Embedder.prepare)"
            )
        self.capture_layers = wanted
        self.captured.clear()
        self._free_side()
        self._lib.llama_free(self._ctx)
        self._ctx = None
        self._ctx, self._layer_capture = self._new_context(self.kv_unified)
        self._apply_lora()

    @contextmanager
    def aside(self) -> Iterator[None]:
        """Decode in a second context of the same weights for a while, with a unified cache (the
        embedder evaluating completions of different lengths together, whose captured rows come
        back in batch order only there; and while a pool's sequences are in flight in the main
        context, whose cells stay). It never has the LoRA adapter: its states are the base model's."""
        if self._aside:
            yield
            return
        if self._side is None:
            self._side = self._new_context(True)
        main = (self._ctx, self._layer_capture)
        self._ctx, self._layer_capture = self._side
        self._aside = True
        try:
            yield
        finally:
            self._ctx, self._layer_capture = main
            self._aside = False

    def _free_side(self) -> None:
        if self._side is not None:
            self._lib.llama_free(self._side[0])
            self._side = None

    # ----------------------------------------------------------------- model facts
    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    def identity(self) -> dict[str, Any]:
        return {
            "model": model_name(self.path),
            "sha256": self.sha256,
            "path": str(self.path),
            "n_layers": self.n_layers,
            "dim": self.dim,
            "chat": self.chat,
            "llama_cpp_python": getattr(self._lib, "__version__", "?"),
            **({"lora": dict(self.lora)} if self.lora is not None else {}),
        }

    # ----------------------------------------------------------------- low-level decoding
    def _memory(self) -> Any:
        return self._lib.llama_get_memory(self._ctx)

    def decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, pos, seq, output) rows; at most batch_size rows."""
        lib, b = self._lib, self._batch
        if len(items) > self.batch_size:
            raise BackendError(f"expected at most batch_size={self.batch_size} rows, got {len(items)}")
        for i, (tok, pos, seq, out) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
            b.seq_id[i][0] = seq
            b.logits[i] = out
        b.n_tokens = len(items)
        rc = lib.llama_decode(self._ctx, b)
        self._layer_rows = self._layer_capture.take() if self._layer_capture is not None else {}
        if rc != 0:
            raise BackendError(
                f"expected llama_decode to succeed, got code {rc} (1 = KV cache full); "
                "raise n_ctx or lower n_seq_max / max_new_tokens"
            )

    def set_embeddings(self, on: bool) -> None:
        """Whether decodes also return states (pooling NONE makes every fed token an output)."""
        self._lib.llama_set_embeddings(self._ctx, bool(on))

    def state(self, i: int) -> np.ndarray:
        """The last-layer state (after the final norm) of batch row `i` of the last decode."""
        ptr = self._lib.llama_get_embeddings_ith(self._ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.dim,)).copy()  # [d]

    def states(self, n_rows: int) -> dict[int, np.ndarray]:
        """{layer: [n_rows, d]} of the last decode, every row an output: the last layer (index
        n_layers) and the captured ones (`capture`)."""
        out = {self.n_layers: np.stack([self.state(i) for i in range(n_rows)])}  # [n, d]
        for layer, rows in self._layer_rows.items():
            if len(rows) != n_rows:
                raise BackendError(f"expected {n_rows} captured rows of layer {layer}, got {len(rows)}")
            out[layer] = rows
        return out

    def evaluate_prompt(
        self, tokens: list[int], n_seq: int, want_state: bool = False
    ) -> dict[int, np.ndarray] | None:
        """Clear the cache, decode `tokens` into seq 0 and share them with seqs 1..n_seq-1.

        Only the last token is an output (row 0 of the last decode: its logits, and its states
        {layer: [d]} when `want_state`); the others are decoded with embeddings off, so the LM
        head does not run on them."""
        if not tokens:
            raise BackendError("expected a non-empty prompt, got 0 tokens; render the prompt first")
        if self.in_flight and not self._aside:
            raise BackendError(f"expected no sequences in flight to clear the KV cache, got {self.in_flight}; "
                               "evaluate inside `with backend.aside():`")
        mem = self._memory()
        self._lib.llama_memory_clear(mem, True)
        n = len(tokens)
        self.set_embeddings(False)
        for start in range(0, n - 1, self.batch_size):
            stop = min(n - 1, start + self.batch_size)
            self.decode([(tokens[p], p, 0, False) for p in range(start, stop)])
        self.set_embeddings(want_state)
        self.decode([(tokens[-1], n - 1, 0, True)])
        for s in range(1, n_seq):
            self._lib.llama_memory_seq_cp(mem, 0, s, -1, -1)
        return {layer: rows[0] for layer, rows in self.states(1).items()} if want_state else None

    def _sampler(self, sampling: SamplingConfig, seed: int) -> Any:
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if sampling.temperature == 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        # Temperature before top_p, as transformers, vLLM and OpenAI do.
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(float(sampling.temperature)))
        if sampling.top_p < 1:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(float(sampling.top_p), 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def sample(self, picks: list[tuple[Any, int]]) -> list[int]:
        """The next token of each (sampler chain, row of the last decode), the rows in threads
        (`llamacpp_draw.RowDrawer`: the tokens llama_sampler_sample would draw)."""
        return self._drawer.draw(self._ctx, picks)

    def sampler(self, sampling: SamplingConfig) -> dict[str, Any]:
        """The sampling configuration applied (stored in the run's manifest): nothing but these."""
        if sampling.temperature == 0:
            return {"server": None, "chain": "greedy", "stop": list(sampling.stop), "max_tokens": sampling.max_new_tokens}
        return {"server": None, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0, "min_p": 0.0,
                "repeat_penalty": 1.0, "chain": "temperature, top_p, dist(seed) (llama.cpp sampler chain)",
                "stop": list(sampling.stop), "max_tokens": sampling.max_new_tokens}

    # ----------------------------------------------------------------- generation
    def pool(self, slots: int | None = None) -> Pool:
        """Continuous batching: up to `slots` (default n_seq_max) sequences in flight across requests
        (with batching="prompt": one request at a time, each through its own pool)."""
        if self.batching == "prompt":
            return SequentialPool(self)
        return LlamaCppPool(self, slots, self.share_prefix)

    def generate(self, text: str, sampling: SamplingConfig, seeds: list[int]) -> list[Completion]:
        pool = LlamaCppPool(self, share_prefix=self.share_prefix)
        try:
            pool.submit(GenRequest(0, text, sampling, tuple(seeds)))
            out: list[Completion] = []
            while pool.busy():
                for _, comps in pool.step():
                    out = comps
            return out
        finally:
            pool.close()

    def begin_prompt(self, text: str) -> None:
        """A request for `text` starts: forget states captured for it earlier unless one is in flight."""
        if not self.live_texts[text]:
            self.captured.pop(text, None)
        self.live_texts[text] += 1

    def _captured(self, text: str) -> dict[Any, dict[int, np.ndarray]]:
        """The states kept for `text`: those of prompts in flight, and of the last few finished."""
        if text not in self.captured:
            self.captured[text] = {}
            done = [t for t in self.captured if not self.live_texts[t]]
            for old in done[: max(0, len(done) - CAPTURED_PROMPTS)]:
                del self.captured[old]
        return self.captured[text]

    def close(self) -> None:
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        if getattr(self, "_drawer", None) is not None:
            self._drawer.close()
        if getattr(self, "_batch", None) is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_side", None) is not None:
            self._free_side()
        if getattr(self, "_ctx", None):
            lib.llama_free(self._ctx)
            self._ctx = None
        self._free_lora()
        if getattr(self, "_model", None):
            lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
