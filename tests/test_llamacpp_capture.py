"""LayerCapture: the callback logic on real ggml tensors (fast), then the model (smoke/slow)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from qprobe.errors import BackendError, ConfigError, QProbeError

pytest.importorskip("llama_cpp")

from qprobe.generation import llamacpp_capture as lc  # noqa: E402
from qprobe.generation.llamacpp_capture import LayerCapture, hidden_states, resolve_layer, tensor_names  # noqa: E402

N = 24


# --------------------------------------------------------------------- numbering
def test_resolve_layer_follows_hidden_states_indexing() -> None:
    assert [resolve_layer(L, N) for L in (0, 1, 12, 24, -1, -2, -25)] == [0, 1, 12, 24, 24, 23, 0]
    for bad in (25, -26):
        with pytest.raises(ConfigError, match=r"expected a layer in \[-25, 24\]"):
            resolve_layer(bad, N)


def test_tensor_names() -> None:
    assert tensor_names(0, N) == ("inp_embd", "embd")
    assert tensor_names(1, N) == ("l_out-0",)
    assert tensor_names(23, N) == ("l_out-22",)
    assert tensor_names(24, N) == ("result_norm", "result_embd_pooled")


def test_empty_layers_refused() -> None:
    with pytest.raises(ConfigError, match="at least one layer"):
        LayerCapture([], N)


# --------------------------------------------------------------------- real ggml tensors, no model
class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _Tensors:
    """ggml tensors in a CPU backend buffer, named like llama.cpp's graph nodes."""

    def __init__(self) -> None:
        g = lc._ggml()
        p = ctypes.c_void_p
        for fn, res, args in (
            ("ggml_init", p, [_InitParams]),
            ("ggml_free", None, [p]),
            ("ggml_new_tensor_2d", p, [p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
            ("ggml_set_name", p, [p, ctypes.c_char_p]),
            ("ggml_transpose", p, [p, p]),
            ("ggml_backend_cpu_buffer_type", p, []),
            ("ggml_backend_alloc_ctx_tensors_from_buft", p, [p, p]),
            ("ggml_backend_buffer_free", None, [p]),
            ("ggml_backend_tensor_set", None, [p, p, ctypes.c_size_t, ctypes.c_size_t]),
        ):
            f = getattr(g, fn)
            f.restype, f.argtypes = res, args
        self.g = g
        self.ctx = g.ggml_init(_InitParams(1 << 20, None, True))
        self.pending: list[tuple[int, np.ndarray]] = []
        self.buf = None

    def new(self, name: str, values: np.ndarray, gtype: int = 0) -> int:
        rows, d = values.shape
        t = self.g.ggml_new_tensor_2d(self.ctx, gtype, d, rows)  # ne = [d, rows]
        self.g.ggml_set_name(t, name.encode())
        self.pending.append((t, values))
        return t

    def transposed(self, t: int, name: str) -> int:
        v = self.g.ggml_transpose(self.ctx, t)
        self.g.ggml_set_name(v, name.encode())
        return v

    def alloc(self) -> None:
        self.buf = self.g.ggml_backend_alloc_ctx_tensors_from_buft(
            self.ctx, self.g.ggml_backend_cpu_buffer_type()
        )
        for t, values in self.pending:
            data = np.ascontiguousarray(values)
            self.g.ggml_backend_tensor_set(t, data.ctypes.data, 0, data.nbytes)

    def close(self) -> None:
        if self.buf:
            self.g.ggml_backend_buffer_free(self.buf)
        self.g.ggml_free(self.ctx)


@pytest.fixture
def tensors():
    ts = _Tensors()
    yield ts
    ts.close()


def _graph(cap: LayerCapture, nodes: list[int]) -> list[bool]:
    """What the scheduler does for one ubatch: ask about each node, then hand over the wanted ones."""
    cb = cap._callback
    answers = []
    for t in nodes:
        if cb(t, True, None):
            answers.append(cb(t, False, None))
    return answers


def _rows(n: int, d: int, start: float) -> np.ndarray:
    return (start + np.arange(n * d, dtype=np.float32)).reshape(n, d)  # [n, d]


def test_take_concatenates_ubatches_and_maps_layers(tensors: _Tensors) -> None:
    d = 4
    vals = {}
    ub = []
    for u, n in enumerate((3, 2)):  # two ubatches of 3 and 2 tokens; 1 output each at the end
        names = {
            "embd": n,
            "l_out-0": n,
            "l_out-5": n,
            "attn_norm-0": n,
            "l_out-23": 1,
            "result_embd_pooled": 1,
        }
        nodes = []
        for name, rows in names.items():
            vals[(u, name)] = _rows(rows, d, 1000 * u + 100 * len(nodes))
            nodes.append(tensors.new(name, vals[(u, name)]))
        ub.append(nodes)
    tensors.alloc()
    cap = LayerCapture([0, 6, -1, 24], N)
    assert cap.wanted == {"inp_embd": 0, "embd": 0, "l_out-5": 6, "result_norm": 24, "result_embd_pooled": 24}
    for nodes in ub:
        assert _graph(cap, nodes) == [True, True, True]
    assert cap.n_calls == 2
    got = cap.take()
    assert sorted(got) == [-1, 0, 6, 24]
    np.testing.assert_array_equal(got[0], np.concatenate([vals[(0, "embd")], vals[(1, "embd")]]))
    np.testing.assert_array_equal(got[6], np.concatenate([vals[(0, "l_out-5")], vals[(1, "l_out-5")]]))
    final = np.concatenate([vals[(0, "result_embd_pooled")], vals[(1, "result_embd_pooled")]])
    np.testing.assert_array_equal(got[-1], final)
    np.testing.assert_array_equal(got[24], final)
    assert got[6].dtype == np.float32 and got[6].shape == (5, d)
    empty = cap.take()  # cleared
    assert all(v.shape == (0, 0) for v in empty.values())


def test_pooled_tensor_skipped_when_result_norm_present(tensors: _Tensors) -> None:
    norm = tensors.new("result_norm", _rows(3, 4, 0))
    pooled = tensors.new("result_embd_pooled", _rows(1, 4, 500))  # pooling LAST: one row a sequence
    norm2 = tensors.new("result_norm", _rows(2, 4, 50))
    pooled2 = tensors.new("result_embd_pooled", _rows(1, 4, 900))
    tensors.alloc()
    cap = LayerCapture([-1], N)
    _graph(cap, [norm, pooled])
    _graph(cap, [norm2, pooled2])
    np.testing.assert_array_equal(cap.take()[-1], np.concatenate([_rows(3, 4, 0), _rows(2, 4, 50)]))


def test_ask_only_for_wanted_names_and_disable(tensors: _Tensors) -> None:
    a = tensors.new("l_out-3", _rows(2, 4, 0))
    b = tensors.new("l_out-4", _rows(2, 4, 0))
    tensors.alloc()
    cap = LayerCapture([4], N)
    assert cap._callback(a, True, None) is True
    assert cap._callback(b, True, None) is False
    cap.enabled = False
    assert cap._callback(a, True, None) is False


def test_stop_after_aborts_at_the_top_layer(tensors: _Tensors) -> None:
    lo = tensors.new("l_out-1", _rows(2, 4, 0))
    hi = tensors.new("l_out-7", _rows(2, 4, 0))
    tensors.alloc()
    assert _graph(LayerCapture([2, 8], N, stop_after=True), [lo, hi]) == [True, False]
    assert _graph(LayerCapture([2, 8], N), [lo, hi]) == [True, True]


def test_views_f16_and_bf16(tensors: _Tensors) -> None:
    base = tensors.new("base", _rows(3, 5, 0))  # ne = [5, 3]
    view = tensors.transposed(base, "l_out-2")  # ne = [3, 5], not contiguous
    half = tensors.new("l_out-9", _rows(2, 3, 0).astype(np.float16), gtype=1)
    bf16 = tensors.new("l_out-10", (_rows(2, 3, 0).view(np.uint32) >> 16).astype(np.uint16), gtype=30)
    tensors.alloc()
    assert not lc._ggml().ggml_is_contiguous(view)
    np.testing.assert_array_equal(lc.read_tensor(view), _rows(3, 5, 0).T[None, None])  # [ne3, ne2, ne1, ne0]
    cap = LayerCapture([3, 10, 11], N)
    _graph(cap, [view, half, bf16])
    got = cap.take()
    np.testing.assert_array_equal(got[3], _rows(3, 5, 0).T)
    np.testing.assert_array_equal(got[10], _rows(2, 3, 0))  # small integers: exact in f16 and bf16
    np.testing.assert_array_equal(got[11], _rows(2, 3, 0))
    assert got[10].dtype == got[11].dtype == np.float32


def test_errors_in_the_callback_surface_at_take(tensors: _Tensors, monkeypatch: pytest.MonkeyPatch) -> None:
    t = tensors.new("l_out-0", _rows(2, 4, 0))
    tensors.alloc()
    cap = LayerCapture([1], N)

    def boom(_: int) -> np.ndarray:
        raise RuntimeError("bad tensor")

    monkeypatch.setattr(lc, "read_tensor", boom)
    assert _graph(cap, [t]) == [True]  # never aborts the graph on our own error
    with pytest.raises(BackendError, match="bad tensor"):
        cap.take()
    assert issubclass(BackendError, QProbeError)


def test_install_sets_the_callback() -> None:
    import llama_cpp

    cap = LayerCapture([-1], N)
    cp = llama_cpp.llama_context_default_params()
    cp.n_seq_max, cp.kv_unified = 4, False
    assert cap.install(cp) is cp
    assert ctypes.cast(cp.cb_eval, ctypes.c_void_p).value == ctypes.cast(cap._callback, ctypes.c_void_p).value


# --------------------------------------------------------------------- the real model
def _model_path() -> str:
    from qprobe.generation.models import default_model_path

    try:
        return str(default_model_path())
    except QProbeError as e:
        pytest.skip(f"default model unavailable: {e}")


TEXT = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.smoke
def test_last_layer_matches_llama_cpp_embed() -> None:
    import llama_cpp

    from qprobe.generation.llamacpp_lib import disable_extra_buffers

    path = _model_path()
    disable_extra_buffers()  # Llama(...) would use AMX kernels that fault on some VMs
    hs = hidden_states(path, TEXT, [0, 12, -1])
    t = hs[0].shape[0]
    assert t > 10 and all(v.shape == (t, 896) and v.dtype == np.float32 for v in hs.values())
    llm = llama_cpp.Llama(
        path,
        embedding=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_LAST,
        flash_attn=True,
        n_ctx=256,
        verbose=False,
    )
    try:
        ref = np.asarray(llm.embed(TEXT, normalize=False), dtype=np.float32).ravel()  # [d]
        assert _cos(hs[-1][-1], ref) > 0.999
        again = hidden_states(llm, TEXT, [12])  # a Llama's model, a fresh context
        np.testing.assert_allclose(again[12], hs[12], rtol=0, atol=1e-4)
    finally:
        llm.close()


@pytest.mark.slow
def test_ubatches_and_batched_sequences_match_single_sequence() -> None:
    from qprobe.generation.llamacpp_capture import _tokenize
    from qprobe.generation.llamacpp_lib import extra_buffers_default, load

    lib = load()
    mp = lib.llama_model_default_params()
    mp.use_extra_bufts = extra_buffers_default()
    model = lib.llama_model_load_from_file(_model_path().encode(), mp)
    seqs = [_tokenize(lib, model, s) for s in ("x = 1\n", "import numpy as np\n", "def f(a, b):\n")]
    cap = LayerCapture([3, -2, -1], int(lib.llama_model_n_layer(model)))
    cp = lib.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max, cp.kv_unified = 256, 64, 5, 3, True
    cp.embeddings, cp.pooling_type = True, lib.LLAMA_POOLING_TYPE_NONE
    cap.install(cp)
    ctx = lib.llama_init_from_model(model, cp)
    b = lib.llama_batch_init(64, 0, 1)
    try:
        rows = [
            (tok, p, s)
            for p in range(max(map(len, seqs)))
            for s, q in enumerate(seqs)
            if p < len(q)
            for tok in (q[p],)
        ]  # interleaved: position-major, as a batched decode feeds them
        for i, (tok, p, s) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, p, 1, True
            b.seq_id[i][0] = s
        b.n_tokens = len(rows)
        assert lib.llama_decode(ctx, b) == 0
        assert cap.n_calls == -(-len(rows) // 5)  # one callback round per ubatch
        got = cap.take()
        for s, q in enumerate(seqs):
            ref = hidden_states(_Ptr(model), q, [3, -2, -1])  # its own context, same model
            mine = [i for i, r in enumerate(rows) if r[2] == s]
            for layer in (3, -2, -1):
                assert _cos(got[layer][mine], ref[layer]).min() > 0.999, (s, layer)
    finally:
        lib.llama_batch_free(b)
        lib.llama_free(ctx)
        lib.llama_model_free(model)


class _Ptr:
    """Something with a `.model` llama_model pointer, as llama_cpp.Llama has."""

    def __init__(self, model: object) -> None:
        self.model = model


@pytest.mark.slow
def test_intermediate_layers_match_transformers() -> None:
    torch = pytest.importorskip("torch")
    from qprobe.generation.hf_load import load_causal_lm

    path = _model_path()
    text = TEXT + "\nprint(fib(10))\n"
    layers = [0, 1, 6, 12, 18, 23, 24]
    hs = hidden_states(path, text, layers)
    lm = load_causal_lm(path, dtype="float32")
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    assert ids.shape[1] == hs[0].shape[0]
    with torch.inference_mode():
        ref = lm.model(ids, output_hidden_states=True).hidden_states
    assert len(ref) == 25
    for layer in layers:
        cos = _cos(hs[layer], ref[layer][0].float().numpy())
        assert cos.min() > 0.999, (layer, cos.min())
