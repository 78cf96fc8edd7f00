"""Hidden states of any layer inside llama.cpp, captured by the scheduler's eval callback.

API::

    cap = LayerCapture(layers=[12, 18, -1], n_layers=24)   # hidden_states-style indices
    cparams = llama_cpp.llama_context_default_params()
    cap.install(cparams)             # sets cb_eval; keep `cap` alive as long as the context
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    llama_cpp.llama_decode(ctx, batch)
    states = cap.take()              # {12: [n_tok, d], 18: [n_tok, d], -1: [n_out, d]} float32

    hidden_states(llm_or_path, "text" or [token ids], layers=[0, 12, -1])
        # -> {layer: [t, d]}: one sequence, fresh context, every token's state

Layer numbering is transformers' `hidden_states` (as `qprobe.features.hf`): 0 is the token
embeddings (graph tensor "embd"/"inp_embd"), L in 1..n-1 the output of decoder block L, i.e.
llama.cpp's residual stream "l_out-(L-1)", and n == -1 the last block's output *after the
final norm* ("result_norm"; renamed "result_embd_pooled" when the context has embeddings on
and pooling NONE), which is what transformers puts in hidden_states[-1] for Qwen2/Llama and
what llama.cpp's embeddings return. Negative L counts from n + 1: -2 is block n-1's output.

Rows: every token of the batch for layers 0..n-1; for layer n only the batch's *output*
tokens (those with `logits[i]` set, or all tokens when the context has embeddings on with
pooling NONE), because llama.cpp drops the other rows before the last block. A batch larger
than n_ubatch is computed as several ubatches, each calling the callback again: `take()`
concatenates them in order. The rows follow the batch order only when the ubatches do: always
with one KV stream (`kv_unified=True` or `n_seq_max=1`); with a stream per sequence
(`kv_unified=False`), llama.cpp's sequential split keeps the order only for a batch of one
sequence, or of one token a sequence listed in increasing sequence id (what the llama.cpp pool
decodes; other batches go to a unified context, `LlamaCppBackend.aside`).

Cost: the scheduler asks about every graph node (about 820 per ubatch here) and, for each
wanted tensor, stops the graph there, calls back, and resumes: one extra thread-pool round
per captured tensor (benchmarks/results/capture.md). `stop_after=True` aborts the graph right
after the highest wanted layer (the rest of the blocks and the LM head never run): only for
contexts thrown away afterwards, since the KV cache of the skipped blocks is left unwritten.
Measured: no overhead beyond noise (+-2 %) for 3 layers during a 16-sequence decode.

`hidden_states()` uses llama.cpp's default flash-attention setting ("auto": on for CPU), so its
last layer equals `Llama(..., embedding=True, flash_attn=True).embed()` exactly (cosine
0.9997 against flash_attn=False). Create a `Llama` only after
`qprobe.generation.llamacpp_lib.disable_extra_buffers()` on AMX machines (its kernels fault).

The ggml functions come from the libggml-base shipped with llama-cpp-python; `ne`/`nb`/type
are read from the first fields of `struct ggml_tensor` (unchanged in ggml for years), checked
against `ggml_nelements` on each tensor.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.errors import BackendError, ConfigError, require

FINAL_NAMES = ("result_norm", "result_embd_pooled")  # the second only with pooling NONE
EMBED_NAMES = ("inp_embd", "embd")
_GGML_F32, _GGML_F16, _GGML_BF16 = 0, 1, 30
_GGML = None


class _TensorHead(ctypes.Structure):
    """The leading fields of `struct ggml_tensor` (ggml.h), stable since 2023."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
    ]


def _ggml() -> Any:
    """libggml-base of llama-cpp-python, with the prototypes used here."""
    global _GGML
    if _GGML is None:
        llama_cpp = require("llama_cpp", "llamacpp")
        from llama_cpp._ctypes_extensions import load_shared_library

        base = os.environ.get("LLAMA_CPP_LIB_PATH") or str(Path(llama_cpp.__file__).parent / "lib")
        g = load_shared_library("ggml-base", Path(base))
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        for fn, res, args in (
            ("ggml_get_name", ctypes.c_char_p, [p]),
            ("ggml_nelements", i64, [p]),
            ("ggml_nbytes", ctypes.c_size_t, [p]),
            ("ggml_is_contiguous", ctypes.c_bool, [p]),
            ("ggml_type_name", ctypes.c_char_p, [ctypes.c_int]),
            ("ggml_backend_tensor_get", None, [p, p, ctypes.c_size_t, ctypes.c_size_t]),
        ):
            f = getattr(g, fn)
            f.restype, f.argtypes = res, args
        _GGML = g
    return _GGML


def resolve_layer(layer: int, n_layers: int) -> int:
    """A hidden_states index (negative counts from the top) as 0..n_layers."""
    idx = layer + n_layers + 1 if layer < 0 else layer
    if not 0 <= idx <= n_layers:
        raise ConfigError(
            f"expected a layer in [-{n_layers + 1}, {n_layers}] for this {n_layers}-block model "
            f"(0 = embeddings, -1 or {n_layers} = last block after the final norm), got {layer}"
        )
    return idx


def tensor_names(idx: int, n_layers: int) -> tuple[str, ...]:
    """Graph tensor names that carry hidden_states[idx] (0..n_layers)."""
    if idx == 0:
        return EMBED_NAMES
    if idx == n_layers:
        return FINAL_NAMES
    return (f"l_out-{idx - 1}",)


def read_tensor(t: int) -> np.ndarray:
    """A computed F32/F16/BF16 tensor's data as float32 [ne3, ne2, ne1, ne0] (views handled)."""
    g = _ggml()
    head = _TensorHead.from_address(t)
    ne, nb = list(head.ne), list(head.nb)
    if int(np.prod(ne)) != g.ggml_nelements(t):
        raise BackendError(
            f"expected struct ggml_tensor to start with type, buffer, ne[4], nb[4], got ne={ne} but "
            f"ggml_nelements={g.ggml_nelements(t)}; this llama-cpp-python's ggml changed its layout"
        )
    dtype: np.dtype[Any]
    if head.type == _GGML_F32:
        dtype = np.dtype(np.float32)
    elif head.type in (_GGML_F16, _GGML_BF16):
        dtype = np.dtype(np.float16 if head.type == _GGML_F16 else np.uint16)
    else:
        name = (g.ggml_type_name(head.type) or b"?").decode()
        raise BackendError(
            f"expected an F32, F16 or BF16 hidden state, got a {name} tensor; cannot decode it"
        )
    nbytes = int(g.ggml_nbytes(t))
    raw = np.empty(nbytes, dtype=np.uint8)
    if nbytes:
        g.ggml_backend_tensor_get(t, raw.ctypes.data, 0, nbytes)
    if g.ggml_is_contiguous(t):
        arr = raw.view(dtype).reshape(ne[::-1])
    else:  # a view: walk its strides inside the span ggml_nbytes covers
        arr = np.lib.stride_tricks.as_strided(raw.view(dtype), shape=ne[::-1], strides=nb[::-1])
    if head.type == _GGML_BF16:
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return np.ascontiguousarray(arr, dtype=np.float32)


class LayerCapture:
    """Collects hidden states of chosen layers during `llama_decode` (see the module docstring)."""

    def __init__(self, layers: list[int], n_layers: int, stop_after: bool = False) -> None:
        if not layers:
            raise ConfigError("expected at least one layer to capture, got none; e.g. layers=[-1]")
        self.n_layers = int(n_layers)
        self.layers = list(dict.fromkeys(int(L) for L in layers))
        self.index = {L: resolve_layer(L, self.n_layers) for L in self.layers}  # user layer -> 0..n
        self.wanted: dict[str, int] = {}  # tensor name -> 0..n
        for idx in set(self.index.values()):
            self.wanted.update(dict.fromkeys(tensor_names(idx, self.n_layers), idx))
        self.stop_after = bool(stop_after)
        self._top = max(self.index.values())
        self._parts: dict[int, list[np.ndarray]] = {}  # 0..n -> [rows, d] per ubatch, in order
        self._ubatch: set[bytes] = set()  # tensor names already seen in the current ubatch
        self._wanted_b = {k.encode(): v for k, v in self.wanted.items()}
        self._error: BaseException | None = None
        self.n_calls = 0  # ubatches seen (counted at the first wanted tensor of each)
        self.enabled = True
        lib = require("llama_cpp", "llamacpp")
        self._get_name = _ggml().ggml_get_name
        self._callback = lib.ggml_backend_sched_eval_callback(self._on_tensor)  # keep alive

    # ----------------------------------------------------------------- hooking
    def install(self, cparams: Any) -> Any:
        """Point a `llama_context_params` at this capture (before `llama_init_from_model`)."""
        cparams.cb_eval = self._callback
        cparams.cb_eval_user_data = None
        return cparams

    def _on_tensor(self, t: int, ask: bool, user_data: Any) -> bool:
        # Called for every graph node of every ubatch (~820 here): the ask path stays minimal.
        try:
            raw = self._get_name(t)
            idx = self._wanted_b.get(raw)
            if ask:
                return idx is not None and self.enabled
            if idx is None:
                return True
            if raw in self._ubatch:  # each ubatch's graph shows a name once: this is the next one
                self._ubatch = set()
            if not self._ubatch:
                self.n_calls += 1
            self._ubatch.add(raw)
            if raw == b"result_embd_pooled" and b"result_norm" in self._ubatch:
                return True  # pooling other than NONE: a pooled [n_seq, d], not per token
            arr = read_tensor(t)  # [.., rows, d]
            self._parts.setdefault(idx, []).append(arr.reshape(-1, arr.shape[-1]))
            return not (self.stop_after and idx == self._top)
        except BaseException as e:  # never raise through C: report at take()
            self._error = self._error or e
            return True

    # ----------------------------------------------------------------- results
    def take(self) -> dict[int, np.ndarray]:
        """{layer: [rows, d] float32} since the last take(), ubatches concatenated; clears."""
        parts, self._parts, self._ubatch = self._parts, {}, set()
        err, self._error = self._error, None
        if err is not None:
            raise BackendError(f"expected to read the captured tensors, got {err!r}") from err
        dim = next((p[0].shape[-1] for p in parts.values() if p), 0)
        out: dict[int, np.ndarray] = {}
        for layer, idx in self.index.items():
            got = parts.get(idx)
            out[layer] = np.concatenate(got) if got else np.zeros((0, dim), np.float32)  # [rows, d]
        return out

    def clear(self) -> None:
        self.take()


# --------------------------------------------------------------------- one-shot convenience
def _model_pointer(llm: Any) -> tuple[Any, Any]:
    """(llama_model pointer, owner to keep alive or None) from a Llama, a back-end or a path."""
    if isinstance(llm, (str, os.PathLike)):
        from qprobe.generation.llamacpp_lib import extra_buffers_default, load
        from qprobe.generation.models import resolve_model

        lib = load()
        mparams = lib.llama_model_default_params()
        mparams.use_extra_bufts = extra_buffers_default()
        path = resolve_model(str(llm))
        model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise BackendError(f"expected a loadable GGUF model, got '{path}'; is the file complete?")
        return model, None
    for attr in ("model", "_model"):  # llama_cpp.Llama.model, LlamaCppBackend._model
        ptr = getattr(llm, attr, None)
        if ptr is not None and not isinstance(ptr, (str, os.PathLike)) and not hasattr(ptr, "model"):
            return ptr, llm
    raise ConfigError(
        f"expected a llama_cpp.Llama, a LlamaCppBackend or a .gguf path, got {type(llm).__name__}"
    )


def _tokenize(lib: Any, model: Any, text: str) -> list[int]:
    """Tokens as generation makes them: special tokens parsed, BOS added if the model wants one."""
    vocab = lib.llama_model_get_vocab(model)
    data = text.encode("utf-8")
    cap = len(data) + 16
    buf = (lib.llama_token * cap)()
    n = lib.llama_tokenize(vocab, data, len(data), buf, cap, True, True)
    if n < 0:
        cap = -n
        buf = (lib.llama_token * cap)()
        n = lib.llama_tokenize(vocab, data, len(data), buf, cap, True, True)
    return list(buf[:n])


def hidden_states(
    llm: Any,
    text_or_tokens: str | list[int],
    layers: list[int],
    *,
    n_ubatch: int = 512,
    n_threads: int | None = None,
) -> dict[int, np.ndarray]:
    """{layer: [t, d] float32}: every token's state of one sequence, in a fresh context.

    `llm`: a `llama_cpp.Llama`, a `LlamaCppBackend` (its model is shared, its own context is not
    touched) or a GGUF path / 'default'. Text is tokenised with BOS if the model adds one and
    special tokens parsed. The graph stops after the highest requested layer."""
    from qprobe.generation.llamacpp_lib import default_threads, load

    lib = load()
    model, _owner = _model_pointer(llm)
    owned = _owner is None
    ctx = batch = None
    try:
        tokens = (
            _tokenize(lib, model, text_or_tokens) if isinstance(text_or_tokens, str) else list(text_or_tokens)
        )
        if not tokens:
            raise ConfigError("expected at least one token, got an empty input")
        n_layers = int(lib.llama_model_n_layer(model))
        cap = LayerCapture(layers, n_layers, stop_after=True)
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = max(64, len(tokens))
        cparams.n_batch = len(tokens)
        cparams.n_ubatch = min(int(n_ubatch), len(tokens))
        cparams.n_seq_max = 1
        threads = n_threads or default_threads()
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.embeddings = True  # every token is an output: the final layer has all rows
        cparams.pooling_type = lib.LLAMA_POOLING_TYPE_NONE
        cap.install(cparams)
        ctx = lib.llama_init_from_model(model, cparams)
        if not ctx:
            raise BackendError(f"expected a llama.cpp context of {len(tokens)} tokens, could not create one")
        batch = lib.llama_batch_init(len(tokens), 0, 1)
        for i, tok in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, i, 1, True
            batch.seq_id[i][0] = 0
        batch.n_tokens = len(tokens)
        rc = lib.llama_decode(ctx, batch)
        if rc != 0:
            raise BackendError(f"expected llama_decode to succeed, got code {rc}")
        out = cap.take()
        for layer, arr in out.items():
            if arr.shape[0] != len(tokens):
                raise BackendError(f"expected {len(tokens)} rows for layer {layer}, got {arr.shape[0]}")
        return out
    finally:
        if batch is not None:
            lib.llama_batch_free(batch)
        if ctx:
            lib.llama_free(ctx)
        if owned:
            lib.llama_model_free(model)
