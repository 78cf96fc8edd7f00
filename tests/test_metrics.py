"""Evaluation maths against brute force: every k-subset enumerated by an independent reference."""

from __future__ import annotations

import itertools
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qprobe.errors import ConfigError
from qprobe.intervals import bootstrap_ci, paired_bootstrap_ci
from qprobe.metrics import (
    expected_return,
    expected_return_many,
    expected_return_with_error,
    group_expected_return,
    paper_chunk_return,
    pass_at_k,
    pass_at_k_many,
)

BETAS = [0.0, 0.01, 0.1, 1.0]


def brute_return(scores, rewards, k, beta):
    """Mean over every k-subset of the policy's reward; ties at beta=0 broken uniformly."""
    s, r = np.asarray(scores, float), np.asarray(rewards, float)
    total = 0.0
    subsets = list(itertools.combinations(range(len(s)), k))
    for sub in subsets:
        q, rr = s[list(sub)], r[list(sub)]
        if beta == 0:
            top = q == q.max()
            total += rr[top].mean()
        else:
            w = np.exp((q - q.max()) / beta)
            total += (w * rr).sum() / w.sum()
    return total / len(subsets)


@st.composite
def prompt_case(draw, max_n=8):
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(1, n))
    if draw(st.booleans()):  # small integer set: forces ties, also across the k-boundary
        scores = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    else:
        scores = draw(st.lists(st.floats(-10, 10, allow_nan=False), min_size=n, max_size=n))
    if draw(st.booleans()):
        rewards = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    else:
        rewards = draw(st.lists(st.floats(-5, 5, allow_nan=False), min_size=n, max_size=n))
    return np.array(scores, float), np.array(rewards, float), k


# ------------------------------------------------------------------------------------ pass@k
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_brute_force(nck):
    n, c, k = nck
    correct = set(range(c))
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(bool(correct & set(sub)) for sub in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 400).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_comb_formula_exactly(nck):
    n, c, k = nck
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-300)


def test_pass_at_k_literals_and_errors():
    assert pass_at_k(200, 0, 48) == 0.0 and math.copysign(1, pass_at_k(200, 0, 48)) == 1
    assert pass_at_k(200, 200, 48) == 1.0
    assert pass_at_k(5, 1, 1) == pytest.approx(0.2)
    assert pass_at_k(10_000, 3, 5000) == pytest.approx(1 - 0.5 * 4999 / 9999 * 4998 / 9998)
    for bad in [(3, 1, 4), (3, 4, 1), (-1, 0, 1), (3, -1, 1), (3, 1, 0), (3, 1, True), (3.0, 1, 1)]:
        with pytest.raises(ConfigError):
            pass_at_k(*bad)


def test_pass_at_k_many_equals_loop():
    rng = np.random.default_rng(0)
    ns = rng.integers(48, 300, size=500)
    cs = rng.integers(0, ns + 1)
    many = pass_at_k_many(ns, cs, 48)
    loop = np.array([pass_at_k(int(n), int(c), 48) for n, c in zip(ns, cs, strict=True)])
    np.testing.assert_allclose(many, loop, rtol=1e-11, atol=1e-15)
    assert pass_at_k_many(np.array([], int), np.array([], int), 3).shape == (0,)
    with pytest.raises(ConfigError):
        pass_at_k_many([5, 3], [1, 1], 4)  # n < k
    with pytest.raises(ConfigError):
        pass_at_k_many([5], [6], 1)


# --------------------------------------------------------------------------- expected return
@settings(max_examples=1000, deadline=None)
@given(prompt_case(), st.sampled_from(BETAS))
def test_expected_return_matches_brute_force(case, beta):
    s, r, k = case
    assert expected_return(s, r, k, beta) == pytest.approx(brute_return(s, r, k, beta), abs=1e-10)
    enum = expected_return_with_error(s, r, k, beta, method="enumerate")
    assert enum[0] == pytest.approx(brute_return(s, r, k, beta), abs=1e-10) and enum[1] == 0.0


@settings(max_examples=60, deadline=None)
@given(prompt_case(max_n=13), st.sampled_from([0.0, 0.001, 0.01, 0.1, 1.0, 100.0]))
def test_expected_return_matches_brute_force_larger_n(case, beta):
    s, r, k = case
    assert expected_return(s, r, k, beta) == pytest.approx(brute_return(s, r, k, beta), abs=1e-10)


@settings(max_examples=100, deadline=None)
@given(prompt_case(), st.sampled_from(BETAS))
def test_k_equal_one_is_mean_and_k_equal_n_is_policy_value(case, beta):
    s, r, _ = case
    assert expected_return(s, r, 1, beta) == pytest.approx(r.mean(), abs=1e-10)
    if beta == 0:
        top = s == s.max()
        whole = r[top].mean()
    else:
        w = np.exp((s - s.max()) / beta)
        whole = (w * r).sum() / w.sum()
    assert expected_return(s, r, len(s), beta) == pytest.approx(whole, abs=1e-10)


@settings(max_examples=100, deadline=None)
@given(prompt_case(), st.sampled_from(BETAS), st.floats(-3, 3), st.floats(0.5, 4), st.randoms())
def test_invariances(case, beta, shift, scale, rnd):
    s, r, k = case
    base = expected_return(s, r, k, beta)
    assert expected_return(s, r + shift, k, beta) == pytest.approx(base + shift, abs=1e-9)
    perm = list(range(len(s)))
    rnd.shuffle(perm)
    assert expected_return(s[perm], r[perm], k, beta) == pytest.approx(base, abs=1e-10)
    if s.max() - s.min() < 1e6:  # scores and temperature scale together
        assert expected_return(s * scale, r, k, beta * scale) == pytest.approx(base, abs=1e-9)


def test_ties_across_the_boundary_literals():
    # subsets of 2 from 3: {0,1} tie -> 0.5, {0,2} -> 1, {1,2} -> 0
    assert expected_return([1, 1, 0], [1, 0, 0], 2) == pytest.approx(0.5)
    # all tied: every policy is uniform
    assert expected_return([2, 2, 2, 2], [1, 0, 0, 0], 3) == pytest.approx(0.25)
    # ranks 2 and 3 tie across the k=2 boundary; subsets {0,1} {0,2} {0,3} {1,2} {1,3} {2,3}
    s, r = [0, 1, 1, 3], [0, 1, 0, 1]
    assert expected_return(s, r, 2) == pytest.approx((1 + 0 + 1 + 0.5 + 1 + 1) / 6)
    assert expected_return(s, r, 3) == pytest.approx(brute_return(s, r, 3, 0.0))


def test_large_prompt_small_beta_is_stable_and_agrees_with_monte_carlo():
    rng = np.random.default_rng(3)
    s = rng.normal(size=200) * 10  # scores ~10, beta 0.01: exp(Q/beta) would overflow naively
    r = rng.normal(size=200)
    for beta in [0.0, 0.01, 0.1]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            exact = expected_return(s, r, 48, beta)
        mc, err = expected_return_with_error(s, r, 48, beta, method="mc", rng=rng, n_subsets=10_000)
        assert r.min() <= exact <= r.max() and 0 < err < 0.02
        assert abs(exact - mc) < 5 * err
    distinct = rng.permutation(200).astype(float)
    assert expected_return(distinct, r, 48, 1e-6) == pytest.approx(expected_return(distinct, r, 48), abs=1e-9)


def test_method_options_and_errors():
    s, r = np.arange(6.0), np.linspace(0, 1, 6)
    assert expected_return(s, r, 3, 0.1, method="enumerate") == pytest.approx(expected_return(s, r, 3, 0.1))
    assert expected_return_with_error(s, r, 3, 0.1) == (pytest.approx(brute_return(s, r, 3, 0.1)), 0.0)
    with pytest.raises(ConfigError):
        expected_return(np.arange(40.0), np.zeros(40), 20, method="enumerate")  # C(40,20) too many
    with pytest.raises(ConfigError):
        expected_return(s, r, 3, method="nope")
    for bad in [dict(beta=-1.0), dict(beta=float("nan")), dict(k=0)]:
        with pytest.raises(ConfigError):
            expected_return(s, r, **{"k": 3, **bad})
    with pytest.raises(ConfigError):
        expected_return(s, r[:5], 3)
    with pytest.raises(ConfigError):
        expected_return([1.0, np.nan], [0, 1], 1)
    with pytest.raises(ConfigError):
        expected_return([], [], 1)


def test_short_prompt_uses_all_samples_or_raises():
    s, r = [0.3, 0.1, 0.2], [1.0, 0.0, 0.5]
    for beta in BETAS:
        assert expected_return(s, r, 10, beta) == pytest.approx(expected_return(s, r, 3, beta))
    with pytest.raises(ConfigError):
        expected_return(s, r, 10, on_short="raise")
    with pytest.raises(ConfigError):
        expected_return(s, r, 10, on_short="bogus")


@pytest.mark.parametrize("beta", BETAS)
def test_vectorised_forms_equal_the_loop(beta):
    rng = np.random.default_rng(4)
    sizes = [1, 3, 8, 12, 5, 30]
    scores = [rng.integers(0, 4, n).astype(float) for n in sizes]
    rewards = [rng.normal(size=n) for n in sizes]
    loop = np.array([expected_return(s, r, 4, beta) for s, r in zip(scores, rewards, strict=True)])
    np.testing.assert_allclose(expected_return_many(scores, rewards, 4, beta), loop, rtol=0, atol=1e-12)
    ids = np.repeat(np.array([f"p{i}" for i in (5, 2, 9, 0, 7, 1)]), sizes)
    flat_s, flat_r = np.concatenate(scores), np.concatenate(rewards)
    order = rng.permutation(len(ids))  # rows in any order; within-prompt order does not matter
    got_ids, got = group_expected_return(flat_s[order], flat_r[order], ids[order], 4, beta)
    want = dict(zip([f"p{i}" for i in (5, 2, 9, 0, 7, 1)], loop, strict=True))
    assert list(got_ids) == list(dict.fromkeys(ids[order]))  # first appearance
    np.testing.assert_allclose(got, [want[i] for i in got_ids], rtol=0, atol=1e-12)
    with pytest.raises(ConfigError):
        expected_return_many(scores, rewards[:2], 4)
    with pytest.raises(ConfigError):
        group_expected_return(flat_s, flat_r[:-1], ids, 4)


# ------------------------------------------------------------------------- paper's estimator
@pytest.mark.parametrize("beta", BETAS)
def test_paper_chunk_estimator_is_unbiased(beta):
    rng = np.random.default_rng(5)
    s = rng.integers(0, 5, 11).astype(float)  # ties; 11 = 3 chunks of 3 + 2 unused
    r = rng.normal(size=11)
    draws = np.array([paper_chunk_return(s, r, 3, beta, rng) for _ in range(3000)])
    exact = expected_return(s, r, 3, beta)
    assert abs(draws.mean() - exact) < 5 * draws.std() / math.sqrt(draws.size)


def test_paper_chunk_estimator_literals_and_errors():
    rng = np.random.default_rng(0)
    s, r = [0.0, 2.0, 1.0], [0.0, 1.0, 0.5]
    assert paper_chunk_return(s, r, 3, 0.0, rng) == 1.0  # one chunk: argmax
    assert paper_chunk_return(s, r, 7, 0.0, rng) == 1.0  # n < k: one chunk of all n
    assert paper_chunk_return(s, r, 1, 0.5, rng) == pytest.approx(0.5)  # k = 1: mean of all
    with pytest.raises(ConfigError):
        paper_chunk_return(s, r, 1, 0.0, 0)


# ------------------------------------------------------------------------------- bootstrap CIs
def test_bootstrap_ci_contains_mean_and_narrows():
    rng = np.random.default_rng(6)
    values = rng.binomial(1, 0.3, size=400).astype(float)
    m, lo, hi = bootstrap_ci(values[:50], rng=np.random.default_rng(1), n_resamples=2000)
    assert lo <= m <= hi and m == pytest.approx(values[:50].mean())
    m2, lo2, hi2 = bootstrap_ci(values, rng=np.random.default_rng(1), n_resamples=2000)
    assert lo2 <= m2 <= hi2 and hi2 - lo2 < hi - lo
    again = bootstrap_ci(values, rng=np.random.default_rng(1), n_resamples=2000)
    assert again == (m2, lo2, hi2)  # reproducible from the generator
    assert bootstrap_ci([0.4] * 30) == (0.4, 0.4, 0.4)  # degenerate
    lumpy = np.zeros(60)
    lumpy[0] = 1.0  # BCa is ill-defined on such data; a finite interval still comes back
    m3, lo3, hi3 = bootstrap_ci(lumpy, n_resamples=500)
    assert lo3 <= m3 <= hi3 and np.isfinite([lo3, hi3]).all()
    for bad in [[1.0], [1.0, np.nan], [[1.0, 2.0]]]:
        with pytest.raises(ConfigError):
            bootstrap_ci(bad)
    with pytest.raises(ConfigError):
        bootstrap_ci([1.0, 2.0], confidence=1.5)
    with pytest.raises(ConfigError):
        bootstrap_ci([1.0, 2.0], method="studentized-ish")


def test_paired_bootstrap_ci():
    rng = np.random.default_rng(7)
    difficulty = rng.uniform(size=300)
    a = difficulty + rng.normal(0, 0.05, 300) + 0.03
    b = difficulty + rng.normal(0, 0.05, 300)
    d, lo, hi = paired_bootstrap_ci(a, b, n_resamples=2000, rng=np.random.default_rng(2))
    assert d == pytest.approx((a - b).mean()) and lo <= d <= hi and lo > 0  # pairing sees the gain
    _, ua, ub = bootstrap_ci(a, n_resamples=2000, rng=np.random.default_rng(2))
    assert hi - lo < ub - ua  # pairing removes the per-prompt difficulty
    assert paired_bootstrap_ci(a, a) == (0.0, 0.0, 0.0)
    with pytest.raises(ConfigError):
        paired_bootstrap_ci(a, b[:-1])
