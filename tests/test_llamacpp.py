"""The llama.cpp back-end and embedder, and the default model's assembly from PyPI parts.

Fast tests use fake part packages and pure helpers; tests on the real model are `slow`, except
one `smoke` test (2 samples x 16 tokens + features) that CI runs.
"""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from qprobe.core.types import Completion, Prompt
from qprobe.errors import ConfigError, DataError, MissingDependencyError
from qprobe.generation import models
from qprobe.generation.base import SamplingConfig
from qprobe.generation.llamacpp_text import find_stop as _find_stop
from qprobe.generation.llamacpp_text import prefix_tokens as _prefix_tokens

# ---------------------------------------------------------------- model files (no llama.cpp)


def _fake_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunks: list[bytes]) -> None:
    for i, data in enumerate(chunks, 1):
        pkg = tmp_path / "site" / f"qprobe_fakepart_{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
        (pkg / "__init__.py").write_text(
            textwrap.dedent(f"""
            import os
            def get_part_path():
                return os.path.join(os.path.dirname(__file__), "data", "part{i:02d}.bin")
        """)
        )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for i in range(1, 10):  # earlier tests' part modules point at other folders
        monkeypatch.delitem(sys.modules, f"qprobe_fakepart_{i}", raising=False)


def _parted(chunks: list[bytes], n_parts: int | None = None, sha: str | None = None) -> models.PartedModel:
    whole = b"".join(chunks)
    return models.PartedModel(
        name="fake-model",
        filename="fake.gguf",
        module="qprobe_fakepart_{i}",
        n_parts=n_parts or len(chunks),
        extra="pip install 'qprobe[model]'",
        sha256=hashlib.sha256(whole).hexdigest() if sha is None else sha,
        size=len(whole),
    )


def test_assemble_concatenates_in_order_and_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3]
    _fake_parts(tmp_path, monkeypatch, chunks)
    path = models.assemble(_parted(chunks), tmp_path / "cache")
    assert path == tmp_path / "cache" / "fake.gguf"
    assert path.read_bytes() == b"".join(chunks)
    meta = json.loads((tmp_path / "cache" / "fake.gguf.sha256").read_text())
    assert meta["sha256"] == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert meta["size"] == path.stat().st_size
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["fake.gguf", "fake.gguf.sha256"]


def test_assemble_twice_does_not_rewrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [b"x" * 5, b"y" * 5]
    _fake_parts(tmp_path, monkeypatch, chunks)
    spec = _parted(chunks)
    path = models.assemble(spec, tmp_path)
    mtime = path.stat().st_mtime_ns
    assert models.assemble(spec, tmp_path).stat().st_mtime_ns == mtime


def test_assemble_rejects_a_wrong_hash_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = [b"x" * 5, b"y" * 5]
    _fake_parts(tmp_path, monkeypatch, chunks)
    with pytest.raises(DataError, match="force-reinstall"):
        models.assemble(_parted(chunks, sha="0" * 64), tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []


def test_assemble_rebuilds_a_corrupt_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [b"x" * 5, b"y" * 5]
    _fake_parts(tmp_path, monkeypatch, chunks)
    (tmp_path / "fake.gguf").write_bytes(b"truncated")
    assert models.assemble(_parted(chunks), tmp_path).read_bytes() == b"x" * 5 + b"y" * 5


def test_missing_parts_name_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_parts(tmp_path, monkeypatch, [b"x"])
    with pytest.raises(MissingDependencyError, match=r"1 of 2 missing.*pip install 'qprobe\[model\]'"):
        models.assemble(_parted([b"x"], n_parts=2), tmp_path / "c")


def test_file_sha256_uses_the_sidecar_until_the_file_changes(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"hello")
    real = hashlib.sha256(b"hello").hexdigest()
    assert models.file_sha256(f) == real
    side = tmp_path / "m.gguf.sha256"
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "sha256": "cached"}))
    assert models.file_sha256(f) == "cached"  # trusted while size and mtime match
    f.write_bytes(b"hello!")
    assert models.file_sha256(f) == hashlib.sha256(b"hello!").hexdigest()


def test_resolve_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = tmp_path / "x.gguf"
    g.write_bytes(b"GGUF")
    assert models.resolve_model(str(g)) == g
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=".gguf"):
        models.resolve_model(str(tmp_path / "x.bin"))
    with pytest.raises(ConfigError, match="expected 'default'"):
        models.resolve_model("no-such-model")
    monkeypatch.setenv("QPROBE_CACHE", str(tmp_path / "qc"))
    assert models.cache_dir() == tmp_path / "qc" / "models"


def test_stop_helpers() -> None:
    assert _find_stop(b"abc\n\ndef", ("\n\n", "de")) == 3
    assert _find_stop(b"abc", ("x",)) is None
    assert _find_stop("é".encode()[:1], ("x",)) is None  # half a character
    pieces = {1: b"ab", 2: b"c", 3: b"d\n\n"}
    assert _prefix_tokens([1, 2, 3], "abc", pieces.__getitem__) == [1, 2]
    assert _prefix_tokens([1, 2, 3], "abcd", pieces.__getitem__) is None  # cut inside token 3
    assert _prefix_tokens([1, 2], "", pieces.__getitem__) == []


# ---------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def backend():
    pytest.importorskip("llama_cpp")
    from qprobe.generation.llamacpp import LlamaCppBackend

    try:
        b = LlamaCppBackend(n_ctx=4096)
    except MissingDependencyError as exc:
        pytest.skip(str(exc))
    yield b
    b.close()


CHAT = Prompt(
    id="p", text="", messages=({"role": "user", "content": "Write a Python function that adds two numbers."},)
)
CODE = 'def fib(n):\n    """Return the n-th Fibonacci number."""\n'


@pytest.mark.smoke
def test_smoke_generate_and_embed(backend) -> None:
    from qprobe.features.llamacpp import LlamaCppEmbedder
    from qprobe.features.spec import FeatureRequest

    emb = LlamaCppEmbedder(backend)
    text = backend.render(CHAT)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    comps = backend.generate(text, SamplingConfig(max_new_tokens=16, seed=0), [11, 12])
    assert [c.seed for c in comps] == [11, 12]
    for c in comps:
        assert c.finish_reason in ("stop", "length") and 0 < c.n_tokens <= 16
        assert c.n_tokens == len(c.token_ids) and backend.detokenize(c.token_ids) == c.text
    feats = emb.embed(text, comps, [FeatureRequest(-1, "last"), FeatureRequest(-1, "mean")])
    assert feats["L-1_last"].shape == (2, 896) and feats["L-1_last"].dtype == np.float32
    assert feats["L-1_mean"].shape == (2, 896) and np.isfinite(feats["L-1_mean"]).all()
    assert emb.stats["captured"] == 2  # states kept from generation, no second evaluation
    ident = backend.identity()
    assert ident["sha256"] == models.DEFAULT_MODEL.sha256 and (ident["n_layers"], ident["dim"]) == (24, 896)


@pytest.mark.slow
def test_default_model_is_assembled_and_verified() -> None:
    try:
        path = models.default_model_path()
    except MissingDependencyError as exc:
        pytest.skip(str(exc))
    assert path.stat().st_size == models.DEFAULT_MODEL.size
    assert models.file_sha256(path) == models.DEFAULT_MODEL.sha256
    assert models.resolve_model("default") == path == models.resolve_model(None)


@pytest.mark.slow
def test_same_seeds_same_texts_across_instances(backend) -> None:
    from qprobe.generation.llamacpp import LlamaCppBackend

    text = backend.render(CHAT)
    sc = SamplingConfig(temperature=0.8, max_new_tokens=32)
    a = backend.generate(text, sc, [1, 2, 3, 4])
    assert [c.text for c in backend.generate(text, sc, [1, 2, 3, 4])] == [c.text for c in a]
    with LlamaCppBackend(n_ctx=4096) as fresh:  # a new context, as after a restart
        assert [c.text for c in fresh.generate(text, sc, [1, 2, 3, 4])] == [c.text for c in a]
    assert len({c.text for c in a}) > 1  # different seeds sample differently


@pytest.mark.slow
def test_greedy_ignores_the_seed(backend) -> None:
    out = backend.generate(CODE, SamplingConfig(temperature=0, max_new_tokens=12), [1, 2, 3])
    assert len({c.text for c in out}) == 1


@pytest.mark.slow
def test_stop_sequence_is_removed(backend) -> None:
    free = backend.generate(CODE, SamplingConfig(max_new_tokens=40), [7])[0]
    stop = free.text[12:15]
    at = free.text.find(stop)
    cut = backend.generate(CODE, SamplingConfig(max_new_tokens=40, stop=(stop,)), [7])[0]
    assert cut.text == free.text[:at] and cut.finish_reason == "stop"
    assert backend.detokenize(cut.token_ids) == cut.text and cut.n_tokens == len(cut.token_ids)


@pytest.mark.slow
def test_finish_reasons(backend) -> None:
    short = backend.generate(CODE, SamplingConfig(max_new_tokens=4), [1, 2])
    assert [(c.finish_reason, c.n_tokens) for c in short] == [("length", 4), ("length", 4)]
    yes = Prompt(id="y", text="", messages=({"role": "user", "content": "Reply with the single word: yes"},))
    out = backend.generate(backend.render(yes), SamplingConfig(temperature=0, max_new_tokens=32), [1])[0]
    assert out.finish_reason == "stop" and "<|im_end|>" not in out.text and out.n_tokens < 32


@pytest.mark.slow
def test_k_samples_share_one_prompt_evaluation(backend, monkeypatch: pytest.MonkeyPatch) -> None:
    rows: list[tuple[int, int, int, bool]] = []
    original = backend.decode

    def spy(items):
        rows.extend(items)
        return original(items)

    monkeypatch.setattr(backend, "decode", spy)
    monkeypatch.setattr(backend, "capture_states", False)  # no extra feed of the last token
    text = backend.render(CHAT)
    n_prompt = len(backend.prompt_tokens(text))
    out = backend.generate(text, SamplingConfig(max_new_tokens=8), [1, 2, 3, 4])
    assert sum(1 for r in rows if r[1] < n_prompt - 1) == n_prompt - 1  # each prompt token once...
    assert sum(1 for r in rows if r[1] == n_prompt - 1) == 4  # ... but the last, once a sequence
    steps = {r[1] for r in rows if r[1] >= n_prompt}
    assert len(rows) - (n_prompt - 1) - 4 == sum(c.n_tokens for c in out) - sum(
        c.finish_reason == "length" for c in out
    )
    assert max(sum(1 for r in rows if r[1] == p) for p in steps) == 4  # sequences decode together


@pytest.mark.slow
def test_features_match_llama_cpp_embed(backend) -> None:
    from llama_cpp import Llama

    from qprobe.features.llamacpp import LlamaCppEmbedder
    from qprobe.features.spec import FeatureRequest
    from qprobe.generation.llamacpp_lib import disable_extra_buffers

    emb = LlamaCppEmbedder(backend)
    reqs = [FeatureRequest(-1, "last"), FeatureRequest(24, "mean"), FeatureRequest(-1, "tokens")]
    comps = backend.generate(CODE, SamplingConfig(max_new_tokens=20, stop=("\n\n",)), [1, 2, 3])
    captured = emb.embed(CODE, comps, reqs)
    backend.captured.clear()  # force the re-evaluation path (prompt once + completion tokens)
    fresh = emb.embed(CODE, comps, reqs)
    assert emb.stats == {"captured": 3, "evaluated": 3}

    def cos(a, b):
        return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)

    assert cos(captured["L-1_last"], fresh["L-1_last"]).min() > 0.999
    assert cos(captured["L24_mean"], fresh["L24_mean"]).min() > 0.999
    for c, toks, last, mean in zip(
        comps, captured["L-1_tokens"], captured["L-1_last"], captured["L24_mean"], strict=True
    ):
        assert toks.shape == (max(c.n_tokens, 1), 896)
        np.testing.assert_allclose(toks[-1], last, rtol=1e-6)
        np.testing.assert_allclose(toks.mean(0), mean, rtol=1e-5, atol=1e-6)
    disable_extra_buffers()
    ref = Llama(str(backend.path), embedding=True, pooling_type=3, n_ctx=1024, verbose=False)
    try:
        for c, v in zip(comps, captured["L-1_last"], strict=True):
            assert cos(v, np.array(ref.embed(CODE + c.text, normalize=False))) > 0.999
    finally:
        ref.close()


@pytest.mark.slow
def test_token_pieces_align_with_token_states(backend) -> None:
    """One string per 'tokens' state row (the credit map's labels): multi-byte characters split across
    tokens go to the token that completes them, and the pieces join to the completion's text."""
    from qprobe.features.llamacpp import LlamaCppEmbedder
    from qprobe.features.spec import FeatureRequest

    emb = LlamaCppEmbedder(backend)
    comps = [Completion("    return 'h\u00e9llo \u2713 \u4f60\u597d \U0001f600'\n", 0, "stop", 1),
             Completion("", 0, "stop", 2)]
    states = emb.embed(CODE, comps, [FeatureRequest(18, "tokens")])["L18_tokens"]
    pieces = emb.token_pieces(comps)
    assert [len(p) for p in pieces] == [len(s) for s in states] == [len(emb.completion_ids(comps[0])), 1]
    assert "".join(pieces[0]) == comps[0].text and pieces[1] == [""]
    assert "\ufffd" not in "".join(pieces[0])


@pytest.mark.slow
def test_intermediate_layers_are_captured_while_generating(backend) -> None:
    from qprobe.features.llamacpp import LlamaCppEmbedder
    from qprobe.features.spec import FeatureRequest

    emb = LlamaCppEmbedder(backend)
    reqs = [FeatureRequest(12, "mean"), FeatureRequest(-7, "last"), FeatureRequest(-1, "last")]
    emb.embed(CODE, backend.generate(CODE, SamplingConfig(max_new_tokens=4), [9]), reqs)  # installs the capture
    assert backend.capture_layers == (12, 18)
    comps = backend.generate(CODE, SamplingConfig(max_new_tokens=12, stop=("\n\n",)), [1, 2, 3])
    before = dict(emb.stats)
    captured = emb.embed(CODE, comps, reqs)
    assert emb.stats["captured"] - before["captured"] == 3  # no second evaluation
    backend.captured.clear()  # the re-evaluation path: prompt once + the completions' tokens
    fresh = emb.embed(CODE, comps, reqs)
    for key in ("L12_mean", "L-7_last", "L-1_last"):
        a, b = captured[key], fresh[key]
        assert a.shape == (3, 896)
        cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert cos.min() > 0.999, key
    assert not np.allclose(captured["L12_mean"], captured["L-1_last"], atol=1e-2)


@pytest.mark.slow
def test_other_layers_can_come_from_transformers(backend) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from qprobe.features.llamacpp import LlamaCppEmbedder
    from qprobe.features.spec import FeatureRequest

    emb = LlamaCppEmbedder(backend, layers_from="transformers", hf_options={"dtype": "float32"})
    comps = backend.generate(CODE, SamplingConfig(max_new_tokens=12), [1, 2])
    feats = emb.embed(CODE, comps, [FeatureRequest(12, "mean"), FeatureRequest(-1, "last")])
    assert feats["L12_mean"].shape == (2, 896) and feats["L12_mean"].dtype == np.float32
    native = LlamaCppEmbedder(backend).embed(CODE, comps, [FeatureRequest(12, "mean")])["L12_mean"]
    hf_last = emb.transformers().embed(CODE, comps, [FeatureRequest(-1, "last")])["L-1_last"]

    def cos(a, b):
        return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)

    assert cos(hf_last, feats["L-1_last"]).min() > 0.99  # same weights (dequantised), same tokens
    assert cos(native, feats["L12_mean"]).min() > 0.99  # llama.cpp's capture agrees with transformers
    assert emb.transformers().identity()["sha256"] == backend.identity()["sha256"]


def test_llama_log_keeps_errors_only_unless_verbose(monkeypatch: pytest.MonkeyPatch) -> None:
    """ggml.h levels: 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous piece."""
    from qprobe.generation import llamacpp_lib as lib

    monkeypatch.delenv("QPROBE_VERBOSE", raising=False)
    lib.set_verbose(None)
    assert [lib.keep_line(level, False) for level in (1, 2, 3, 4)] == [False, False, False, True]
    assert lib.keep_line(5, True) and not lib.keep_line(5, False)
    monkeypatch.setenv("QPROBE_VERBOSE", "1")
    assert lib.keep_line(3, False)
    lib.set_verbose(False)
    assert not lib.keep_line(3, False)
    lib.set_verbose(None)


_LOAD = "from qprobe.generation.llamacpp import LlamaCppBackend; LlamaCppBackend(n_ctx=256).close()"


@pytest.mark.smoke
def test_model_load_prints_none_of_llama_cpp_s_warnings() -> None:
    import os
    import subprocess

    pytest.importorskip("llama_cpp")
    try:
        models.default_model_path()
    except Exception as exc:  # noqa: BLE001 - no model parts installed
        pytest.skip(f"default model unavailable: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "QPROBE_VERBOSE"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    quiet = subprocess.run([sys.executable, "-c", _LOAD], capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr[-500:]
    loud = subprocess.run([sys.executable, "-c", _LOAD], capture_output=True, text=True, timeout=300,
                          env={**env, "QPROBE_VERBOSE": "1"})
    assert loud.returncode == 0 and "pooling_type" in loud.stderr
