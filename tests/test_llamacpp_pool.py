"""Continuous batching: the generic pool driver (fast, fake back-end) and llama.cpp's slot pool (real model)."""

from __future__ import annotations

import numpy as np
import pytest

from qprobe.errors import BackendError, ConfigError, MissingDependencyError
from qprobe.generation.base import BatchedPool, GenRequest, SamplingConfig, SequentialPool, generate_many
from qprobe.generation.fake import FakeBackend

SC = SamplingConfig(max_new_tokens=24, stop=("\n\n",))


# --------------------------------------------------------------------- generic driver (fast)
def test_generate_many_reads_requests_lazily_and_returns_each_once() -> None:
    backend = FakeBackend()
    pulled: list[int] = []

    def asks():
        for i in range(4):
            pulled.append(i)
            yield GenRequest(i, f"p{i}", SC, (i, i + 10))

    seen = []
    for ask, comps in generate_many(backend, asks()):
        seen.append(ask.key)
        assert pulled[-1] <= ask.key + 1  # never more than one request ahead of the one finishing
        assert comps == backend.generate(ask.text, SC, list(ask.seeds))
    assert seen == [0, 1, 2, 3]


def test_sequential_pool_cancel_and_empty_request() -> None:
    pool = SequentialPool(FakeBackend())
    pool.submit(GenRequest("a", "x", SC, (1,)))
    pool.submit(GenRequest("b", "y", SC, (2,)))
    pool.cancel("a")
    assert [r.key for r, _ in pool.step()] == ["b"] and not pool.busy() and pool.step() == []
    with pytest.raises(ConfigError, match="at least one seed"):
        GenRequest("c", "z", SC, ())


class _Batching(FakeBackend):
    """The fake back-end with a multi-prompt call, as vLLM has: records each call's prompts."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []

    def generate_batch(self, texts, sampling, seeds):
        self.calls.append(list(texts))
        return [self.generate(t, sampling, s) for t, s in zip(texts, seeds, strict=True)]

    def pool(self):
        return BatchedPool(self, max_requests=3)


def test_batched_pool_sends_queued_prompts_in_one_call_per_sampling() -> None:
    backend = _Batching()
    other = SamplingConfig(temperature=0.0)
    asks = [GenRequest(i, f"p{i}", other if i == 1 else SC, (i,)) for i in range(5)]
    got = dict(generate_many(backend, asks))
    assert backend.calls == [["p0", "p2"], ["p1"], ["p3", "p4"]]  # 3 queued at most; one sampling a call
    for ask, comps in got.items():
        assert comps == backend.generate(ask.text, ask.sampling, list(ask.seeds))
    with pytest.raises(ConfigError, match="max_requests"):
        BatchedPool(backend, 0)


# --------------------------------------------------------------------- llama.cpp's pool (real model)
@pytest.fixture(scope="module")
def backend():
    pytest.importorskip("llama_cpp")
    from qprobe.generation.llamacpp import LlamaCppBackend

    try:
        b = LlamaCppBackend(n_ctx=2048, n_seq_max=4)
    except MissingDependencyError as exc:
        pytest.skip(str(exc))
    yield b
    b.close()


TEXTS = [f'def times_{i}(x):\n    """Return x times {i}, as an int."""\n' for i in range(3)]
SEEDS = [(1, 2), (3, 4, 5, 6, 7, 8), (9,)]  # the middle one needs more sequences than there are slots


def _asks(sc: SamplingConfig = SC) -> list[GenRequest]:
    return [GenRequest(i, t, sc, s) for i, (t, s) in enumerate(zip(TEXTS, SEEDS, strict=True))]


def _spy(backend, monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[int, int, int, bool]]]:
    batches: list[list[tuple[int, int, int, bool]]] = []
    original = backend.decode

    def spy(items):
        batches.append(list(items))
        return original(items)

    monkeypatch.setattr(backend, "decode", spy)
    return batches


@pytest.mark.smoke
def test_pool_serves_every_seed_of_every_prompt_across_slots(backend, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = _spy(backend, monkeypatch)
    pool = backend.pool()
    mixed = 0  # steps whose running sequences belong to more than one prompt
    got = {}
    try:
        for ask in _asks():
            pool.submit(ask)
        while pool.busy():
            got.update(pool.step())
            mixed += len({sl.job.req.key for sl in pool.slots if sl is not None}) > 1
    finally:
        pool.close()
    assert sorted(a.key for a in got) == [0, 1, 2]
    for ask, comps in got.items():
        assert [c.seed for c in comps] == list(ask.seeds)
        for c in comps:
            assert c.finish_reason in ("stop", "length") and c.n_tokens == len(c.token_ids) <= SC.max_new_tokens
            assert backend.detokenize(c.token_ids) == c.text and "\n\n" not in c.text
    steps = [b for b in batches if all(r[3] for r in b)]  # the prefills have no outputs
    assert max(len(b) for b in steps) == 4 and mixed > 0  # all slots busy, across prompts
    assert all(len({r[2] for r in b}) == len(b) for b in steps)  # one row per sequence a step
    assert backend.in_flight == 0 and not +backend.live_texts


@pytest.mark.slow
def test_pool_is_deterministic_and_matches_one_prompt_at_a_time(backend) -> None:
    first = {a.key: [c.text for c in cs] for a, cs in generate_many(backend, _asks())}
    again = {a.key: [c.text for c in cs] for a, cs in generate_many(backend, _asks())}
    assert first == again
    alone = {i: [c.text for c in backend.generate(t, SC, list(s))] for i, (t, s) in enumerate(zip(TEXTS, SEEDS, strict=True))}
    same = sum(x == y for i in first for x, y in zip(first[i], alone[i], strict=True))
    assert same >= 0.5 * sum(map(len, SEEDS))  # rounding may differ in other batches, rarely


def _same_as_fresh(backend, emb, reqs, ask, comps, feats) -> None:
    """The pool's captured features of `comps` against the embedder evaluating them afresh."""
    backend.captured.clear()
    fresh = emb.embed(ask.text, comps, reqs)
    for key in ("L12_mean", "L-1_last"):
        a, b = feats[key], fresh[key]
        cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert cos.min() > 0.999, key


@pytest.mark.slow
def test_features_captured_in_the_pool_are_each_sequences_own(backend) -> None:
    from qprobe.features.llamacpp import LlamaCppEmbedder
    from qprobe.features.spec import FeatureRequest

    emb = LlamaCppEmbedder(backend)
    reqs = [FeatureRequest(12, "mean"), FeatureRequest(-1, "last"), FeatureRequest(12, "tokens")]
    emb.prepare(reqs)
    done = []
    for ask, comps in generate_many(backend, _asks()):
        done.append((ask, comps, emb.embed(ask.text, comps, reqs)))
    assert emb.stats["evaluated"] == 0
    for ask, comps, feats in done:
        _same_as_fresh(backend, emb, reqs, ask, comps, feats)
        assert [len(t) for t in feats["L12_tokens"]] == [max(c.n_tokens, 1) for c in comps]
    with pytest.raises(BackendError, match="in flight"):
        pool = backend.pool()
        pool.submit(_asks()[0])
        pool.step()
        backend.capture([5])
    pool.close()
    assert backend.in_flight == 0


@pytest.mark.smoke
def test_backend_sample_draws_what_llama_sampler_sample_draws(backend) -> None:
    """`sample` (candidates built here, the chains applied in threads) against llama.cpp's own
    llama_sampler_sample, chain for chain with the same seeds, over several steps of 4 sequences."""
    lib = backend._lib
    tokens = backend.prompt_tokens(TEXTS[0])
    backend.evaluate_prompt(tokens, 4)
    for sc in (SamplingConfig(temperature=0.8, top_p=0.95), SamplingConfig(temperature=1.0), SamplingConfig(temperature=0)):
        ours = [backend._sampler(sc, seed) for seed in range(4)]
        theirs = [backend._sampler(sc, seed) for seed in range(4)]
        rows = [0] * 4
        try:
            for step in range(6):
                want = [int(lib.llama_sampler_sample(smp, backend._ctx, r)) for smp, r in zip(theirs, rows, strict=True)]
                assert backend.sample(list(zip(ours, rows, strict=True))) == want
                backend.decode([(tok, len(tokens) + step, s, True) for s, tok in enumerate(want)])
                rows = list(range(4))
        finally:
            for smp in ours + theirs:
                lib.llama_sampler_free(smp)
        backend.evaluate_prompt(tokens, 4)
    assert backend.n_threads < 2 or backend._drawer.threaded  # the threaded path ran


@pytest.mark.slow
def test_a_stop_cut_inside_a_token_feeds_the_kept_tail_with_the_running_batch(backend, monkeypatch) -> None:
    """A stop string cut inside a token (`x` in ` x`, `x)`, ...) leaves kept text that re-tokenises
    differently; the kept tail's states are decoded as rows of later steps, never in a decode of
    one sequence of its own, and they equal a fresh evaluation of the completion."""
    from qprobe.features.llamacpp import LlamaCppEmbedder
    from qprobe.features.spec import FeatureRequest

    emb = LlamaCppEmbedder(backend)
    reqs = [FeatureRequest(12, "mean"), FeatureRequest(-1, "last")]
    emb.prepare(reqs)
    sc = SamplingConfig(temperature=1.0, max_new_tokens=24, stop=("x",))
    batches = _spy(backend, monkeypatch)
    pool = backend.pool()
    done = []
    try:
        for ask in _asks(sc):
            pool.submit(ask)
        while pool.busy():
            done += pool.step()
    finally:
        pool.close()
    assert pool.tail_tokens > 0  # the case is exercised
    outputs = [b for b in batches if any(r[3] for r in b)]
    assert len(outputs) == pool.steps  # no decode but the steps' own has outputs
    assert all(len({r[2] for r in b}) == len(b) for b in outputs)
    feats = [(ask, comps, emb.embed(ask.text, comps, reqs)) for ask, comps in done]
    assert emb.stats["evaluated"] == 0  # every completion's states came from the pool
    for ask, comps, got in feats:
        assert all("x" not in c.text for c in comps)
        _same_as_fresh(backend, emb, reqs, ask, comps, got)
    assert backend.in_flight == 0


@pytest.mark.slow
def test_a_small_kv_cache_admits_fewer_sequences_and_still_finishes(monkeypatch: pytest.MonkeyPatch) -> None:
    from qprobe.generation.llamacpp import LlamaCppBackend

    sc = SamplingConfig(max_new_tokens=80)
    with LlamaCppBackend(n_ctx=128, n_seq_max=4, kv_unified=True) as small:  # llama.cpp rounds n_ctx up to 256
        batches = _spy(small, monkeypatch)
        n_prompt = len(small.prompt_tokens(TEXTS[1]))
        fit = (small.n_ctx - n_prompt) // (sc.max_new_tokens + 1)
        got = dict(generate_many(small, [GenRequest(0, TEXTS[1], sc, (1, 2, 3, 4, 5))]))
        assert [c.seed for c in next(iter(got.values()))] == [1, 2, 3, 4, 5]
        assert max(len(b) for b in batches if all(r[3] for r in b)) <= fit < 4
        with pytest.raises(BackendError, match="n_ctx"):
            small.pool().submit(GenRequest(1, TEXTS[0] * 20, sc, (1,)))
    with LlamaCppBackend(n_ctx=1024, n_seq_max=4) as streams:  # a stream of 256 cells a sequence
        assert streams.n_ctx_seq == 256 and not streams.kv_unified
        ok = dict(generate_many(streams, [GenRequest(0, TEXTS[1], sc, (1, 2, 3, 4, 5))]))
        assert [c.seed for c in next(iter(ok.values()))] == [1, 2, 3, 4, 5]
        with pytest.raises(BackendError, match="256 KV cells a sequence"):
            streams.pool().submit(GenRequest(1, TEXTS[0] * 8, SamplingConfig(max_new_tokens=200), (1,)))


@pytest.mark.slow
def test_cancel_frees_the_slots_of_a_running_request(backend) -> None:
    pool = backend.pool()
    try:
        for ask in _asks(SamplingConfig(max_new_tokens=64)):
            pool.submit(ask)
        pool.step()
        assert backend.in_flight == 4
        pool.cancel(1)
        finished = []
        while pool.busy():
            finished += [a.key for a, _ in pool.step()]
        assert sorted(finished) == [0, 2]
    finally:
        pool.close()
    assert backend.in_flight == 0


@pytest.mark.slow
def test_the_embedder_evaluates_aside_while_sequences_are_in_flight(backend) -> None:
    """Re-evaluating completions (no captured states) while a pool runs uses a second context: the
    running sequences' cells stay, and their texts equal an uninterrupted run's."""
    from qprobe.features.llamacpp import LlamaCppEmbedder
    from qprobe.features.spec import FeatureRequest

    emb = LlamaCppEmbedder(backend)
    reqs = [FeatureRequest(12, "mean")]
    emb.prepare(reqs)
    plain = {a.key: [c.text for c in cs] for a, cs in generate_many(backend, _asks())}
    other = backend.generate(TEXTS[0], SC, [42])
    backend.captured.clear()
    pool = backend.pool()
    got = {}
    try:
        for ask in _asks():
            pool.submit(ask)
        got.update(pool.step())
        assert backend.in_flight > 0
        with pytest.raises(BackendError, match="in flight"):
            backend.evaluate_prompt(backend.prompt_tokens(TEXTS[0]), 1)
        before = emb.stats["evaluated"]
        feats = emb.embed(TEXTS[0], other, reqs)  # nothing captured for it: evaluated aside
        assert emb.stats["evaluated"] == before + 1 and feats["L12_mean"].shape == (1, 896)
        while pool.busy():
            got.update(pool.step())
    finally:
        pool.close()
    assert {a.key: [c.text for c in cs] for a, cs in got.items()} == plain


HEAD = "You are a careful Python programmer. Answer with the function only, no tests, no prose.\n\n"


def _first_logits(b, share: bool, texts: list[str], monkeypatch: pytest.MonkeyPatch):
    """{request key: logits of its first decode row} and the pool, for prompts decoded together."""
    first: dict[int, np.ndarray] = {}
    prefills: list[list[tuple[int, int, int, bool]]] = []
    original = b.decode
    n_vocab = b._lib.llama_vocab_n_tokens(b._vocab)

    def spy(items):
        original(items)
        if not all(r[3] for r in items):
            prefills.append(list(items))
            return
        for j, (_, _, seq, _) in enumerate(items):
            slot = pool.slots[seq]
            if slot is not None and slot.prefill and slot.job.req.key not in first:
                ptr = b._lib.llama_get_logits_ith(b._ctx, j)
                first[slot.job.req.key] = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()

    monkeypatch.setattr(b, "decode", spy)
    b.share_prefix = share
    pool = b.pool()
    try:
        for i, t in enumerate(texts):
            pool.submit(GenRequest(i, t, SamplingConfig(temperature=0.0, max_new_tokens=8), (i,)))
        while pool.busy():
            pool.step()
    finally:
        pool.close()
        b.share_prefix = True
        monkeypatch.setattr(b, "decode", original)
    return first, pool, prefills


@pytest.mark.smoke
def test_prompts_share_their_common_head_and_get_the_same_next_token_distribution(
        backend, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = [HEAD + t for t in TEXTS] + [HEAD + TEXTS[0]]  # the last: a second request for the first text
    toks = [backend.prompt_tokens(t) for t in texts]
    head = 0
    while all(t[head] == toks[0][head] for t in toks):
        head += 1
    shared, pool, prefills = _first_logits(backend, True, texts, monkeypatch)
    alone, pool0, prefills0 = _first_logits(backend, False, texts, monkeypatch)
    # the first prompt is evaluated whole, the next two from the end of the common head on, the
    # repeated one not at all (all its tokens but the last are the first prompt's)
    assert pool.shared_tokens == 2 * head + len(toks[0]) - 1 and pool0.shared_tokens == 0
    assert pool.prefilled_tokens == sum(len(t) - 1 for t in toks) - pool.shared_tokens
    assert sum(map(len, prefills)) == pool.prefilled_tokens and sum(map(len, prefills0)) == pool0.prefilled_tokens
    assert sorted(min(r[1] for r in b) for b in prefills) == [0, head, head]
    # the copied cells are the very cells: the repeat's logits equal the first prompt's evaluated alone
    np.testing.assert_allclose(shared[3], alone[0], atol=1e-5)
    np.testing.assert_allclose(shared[0], alone[0], atol=1e-5)
    # a head computed in another prompt's prefill rounds differently (measured: at most 0.32 of logits
    # up to 22.4 on the default model), the next token stays the same
    for key in (1, 2):
        a, b = shared[key], alone[key]
        assert np.abs(a - b).max() < 0.05 * np.abs(b).max() and a.argmax() == b.argmax()
    assert backend.in_flight == 0
