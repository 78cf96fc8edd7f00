"""Evaluation maths: pass@k and the expected return of best-of-k selection (intervals: qprobe.intervals).

Everything here is numpy/scipy only and works on one prompt's samples at a time (1-D arrays of
scores Q and rewards r), with vectorised forms over prompts beside each function.

The headline estimator is `expected_return`: the expected reward of the Q-probe policy when its k
candidates are a uniformly random k-subset of a prompt's n stored samples, computed exactly (no
reshuffling noise). The paper's own estimator (one shuffle, disjoint chunks of k) is
`paper_chunk_return`; it has the same expectation but is noisy.

Prompts with fewer than k samples: by default the policy uses all n samples (k' = n) and this is
the documented behaviour everywhere here (`on_short="clip"`); pass `on_short="raise"` to refuse.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from qprobe.errors import ConfigError

__all__ = [
    "expected_return",
    "expected_return_many",
    "expected_return_with_error",
    "group_expected_return",
    "paper_chunk_return",
    "pass_at_k",
    "pass_at_k_many",
]

METHODS = ("auto", "enumerate", "mc")
ENUMERATE_LIMIT = 200_000  # most k-subsets `method="enumerate"` will list
_H = 0.3  # quadrature step in u = log t; trapezoid error <= ~2|Gamma(1 + 2*pi*i/h)| ~ 1e-13
_LEFT, _RIGHT = 36.0, 4.0  # integrand support in v = u + log T: e^-36 ~ 2e-16 and e^(4 - e^4) ~ 1e-22


# ---------------------------------------------------------------------------------------- checks
def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"expected {name} to be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_beta(beta) -> float:
    beta = float(beta)
    if not math.isfinite(beta) or beta < 0:
        raise ConfigError(f"expected beta >= 0 (0 means argmax), got {beta!r}")
    return beta


def _prompt_arrays(scores, rewards) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)  # [n]
    r = np.asarray(rewards, dtype=np.float64)  # [n]
    if s.ndim != 1 or s.shape != r.shape or s.size == 0:
        raise ConfigError(
            f"expected scores and rewards as 1-D arrays of the same length >= 1 (one prompt's "
            f"samples), got shapes {s.shape} and {r.shape}; split flat arrays by prompt first "
            f"(group_expected_return does that)"
        )
    if not (np.isfinite(s).all() and np.isfinite(r).all()):
        raise ConfigError(
            "expected finite scores and rewards, got NaN or inf; drop unscored samples (reward "
            "null) before evaluating"
        )
    return s, r


def _effective_k(n: int, k, on_short: str) -> int:
    k = _check_int("k", k, 1)
    if k <= n:
        return k
    if on_short == "clip":
        return n
    if on_short == "raise":
        raise ConfigError(
            f"expected at least k={k} samples for this prompt, got {n}; collect more samples "
            f"or pass on_short='clip' to select among all n"
        )
    raise ConfigError(f"expected on_short to be 'clip' or 'raise', got {on_short!r}")


# ---------------------------------------------------------------------------------------- pass@k
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    n, c, k = _check_int("n", n, 0), _check_int("c", c, 0), _check_int("k", k, 1)
    if c > n or k > n:
        raise ConfigError(f"expected c <= n and k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # Chen et al. 2021, product form: C(n-c,k)/C(n,k) = prod_{i=n-c+1}^{n} (1 - k/i)
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)
    return float(-np.expm1(np.log1p(-k / i).sum())) + 0.0  # + 0.0: no -0.0 at c = 0


def pass_at_k_many(ns, cs, k: int) -> np.ndarray:
    """`pass_at_k` for many prompts at once (arrays of n and c); returns an array of floats."""
    ns = np.asarray(ns)
    cs = np.asarray(cs)
    k = _check_int("k", k, 1)
    if ns.shape != cs.shape or ns.ndim != 1:
        raise ConfigError(f"expected ns and cs as 1-D arrays of equal length, got {ns.shape}, {cs.shape}")
    if ns.size == 0:
        return np.zeros(0)
    if not (np.issubdtype(ns.dtype, np.integer) and np.issubdtype(cs.dtype, np.integer)):
        raise ConfigError(f"expected integer ns and cs, got dtypes {ns.dtype} and {cs.dtype}")
    if (cs < 0).any() or (cs > ns).any() or (ns < k).any():
        raise ConfigError(f"expected 0 <= c <= n and n >= k={k} for every prompt; check the counts")
    # table L[m] = sum_{i=k+1}^{m} log1p(-k/i), so C(n-c,k)/C(n,k) = exp(L[n] - L[n-c]) when n-c >= k
    i = np.arange(1, int(ns.max()) + 1, dtype=np.float64)
    terms = np.where(i > k, np.log1p(-k / np.maximum(i, k + 1)), 0.0)
    table = np.concatenate([[0.0], np.cumsum(terms)])  # [max_n + 1]
    rest = ns - cs
    log_ratio = table[ns] - table[np.maximum(rest, k)]
    return np.where(rest < k, 1.0, -np.expm1(log_ratio)) + 0.0


# ------------------------------------------------------------------------------ policy over k
def selection_probs(scores: np.ndarray, beta: float) -> np.ndarray:
    """Probability of picking each candidate along the last axis ([k] or [B, k]): softmax(Q/beta), or
    uniform over the tied maxima at beta = 0 (the beta -> 0 limit)."""
    q = np.asarray(scores, dtype=np.float64)  # [..., k]
    top = q.max(axis=-1, keepdims=True)  # [..., 1]
    if beta == 0.0:
        w = (q == top).astype(np.float64)  # [..., k]
    else:
        w = np.exp((q - top) / beta)  # [..., k], log-sum-exp shift
    return w / w.sum(axis=-1, keepdims=True)  # Sec. 4.1, pi(a_i) = exp(Q_i / beta) / sum_j exp(Q_j / beta)


def _subset_returns(s: np.ndarray, r: np.ndarray, idx: np.ndarray, beta: float) -> np.ndarray:
    """Exact reward of the policy on each candidate set idx [B, k] (PAPER.md Evaluation)."""
    return (selection_probs(s[idx], beta) * r[idx]).sum(axis=1)  # [B]


# ---------------------------------------------------------------------------- expected return
def _argmax_return(s: np.ndarray, r: np.ndarray, k: int) -> float:
    # PAPER.md Evaluation: closed form for argmax over a random k-subset, ties averaged
    """beta = 0, exact: the i-th smallest of n is the max of a random k-subset w.p. C(i-1,k-1)/C(n,k).

    Ties: given that the subset's top score is s_g, the chosen sample is uniform over group g, so
    each tie group's probability mass multiplies the group's mean reward (exact across the k-boundary).
    """
    n = s.size
    # w_n = k/n; w_{i-1} = w_i * (i-k)/(i-1): reverse cumulative product, exact zeros for i < k
    ratios = (np.arange(2, n + 1) - k) / np.arange(1, n)  # [n-1], ratio for i = 2..n
    w = (k / n) * np.concatenate([np.cumprod(ratios[::-1])[::-1], [1.0]])  # [n], ascending ranks
    w = np.maximum(w, 0.0)
    values, inverse = np.unique(s, return_inverse=True)  # sorted unique scores
    rank_group = inverse[np.argsort(s, kind="stable")]  # [n] tie group of each ascending rank
    mass = np.bincount(rank_group, weights=w, minlength=values.size)  # [G] P(top score is group g's)
    mean_r = np.bincount(inverse, weights=r, minlength=values.size) / np.bincount(inverse)  # [G]
    return float(mass @ mean_r)


def _quadrature_return(s: np.ndarray, r: np.ndarray, k: int, beta: float) -> float:
    # PAPER.md Evaluation at beta > 0: E_S[sum_i softmax(Q_S/beta)_i r_i], exact via 1/T = int e^{-tT}
    """beta > 0, exact up to ~1e-13 * (reward range) in O(n k G) time.

    With w_i = exp((Q_i - max Q)/beta), T_S = sum_{j in S} w_j and 1/T = int_0^inf e^{-tT} dt:
      E = mean_S sum_{i in S} w_i r_i / T_S = int mean_S [sum_{i in S} t w_i r_i] prod_{j in S} e^{-t w_j} du
    over u = log t. The integrand is a mean over k-subsets of products, i.e. a normalised elementary
    symmetric polynomial, computed by a convex-combination recursion (stable, values <= max r);
    each subset contributes a smooth bump in u, for which the trapezoid rule converges geometrically.
    At a given u, samples with t w_j > e^6.7 have e^{-t w_j} = 0 exactly ("dead") and those with
    t w_j < e^-40 have e^{-t w_j} = 1 and a negligible t w_j r_j ("inert"); the recursion runs only
    over the samples in between, so a small beta with widely spread scores stays cheap.
    """
    n = s.size
    order = np.argsort(s, kind="stable")
    lw = (s[order] - s.max()) / beta  # [n] ascending log weights <= 0
    low = r.min()
    rr = r[order] - low  # [n] >= 0 keeps the recursion free of cancellation
    # a subset's top sample is one of the sorted ranks >= k; T_S lies in [w_top, k * w_top]
    tops = np.unique(lw[k - 1 :])
    lo = np.floor((-_LEFT - math.log(k) - tops) / _H).astype(np.int64)
    hi = np.ceil((_RIGHT - tops) / _H).astype(np.int64)
    grid = np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(lo, hi, strict=True)])) * _H
    blocks = np.floor((grid - grid[0]) / (512 * _H)).astype(np.int64)  # windows of <= 512 points
    bounds = np.flatnonzero(np.diff(blocks)) + 1
    total = 0.0
    for u in np.split(grid[:, None], bounds):  # u: [g, 1]
        first = int(np.searchsorted(lw, -40.0 - u[-1, 0], "left"))  # samples before: inert
        stop = int(np.searchsorted(lw, 6.7 - u[0, 0], "right"))  # samples from here: dead
        if stop < k:
            continue
        z = np.minimum(u.T + lw[first:stop, None], 700.0)  # [m, g] log(t w_j)
        et = np.exp(z)
        x = np.exp(-et)  # [m, g] e^{-t w_j}
        c = rr[first:stop, None] * np.exp(z - et)  # [m, g] t w_j r_j e^{-t w_j}
        p = np.zeros((k + 1, u.shape[0]))  # [k+1, g] mean over size-m subsets of prod x
        q = np.zeros((k + 1, u.shape[0]))  # [k+1, g] same, times sum of t w_i r_i
        p[: min(first, k) + 1] = 1.0
        for j in range(first + 1, stop + 1):
            top = min(j, k)
            m = np.arange(1, top + 1)[:, None]  # [top, 1]
            keep, add = (j - m) / j, m / j  # C(j-1,m)/C(j,m), C(j-1,m-1)/C(j,m)
            xj, cj = x[j - first - 1], c[j - first - 1]  # [g]
            q[1 : top + 1] = keep * q[1 : top + 1] + add * (xj * q[:top] + cj * p[:top])
            p[1 : top + 1] = keep * p[1 : top + 1] + add * (xj * p[:top])
        dead = np.arange(stop + 1, n + 1)
        total += q[k].sum() * np.prod((dead - k) / dead)  # C(stop,k)/C(n,k): subsets avoid dead
    return float(low + _H * total)


def _enumerate_return(s: np.ndarray, r: np.ndarray, k: int, beta: float) -> float:
    """Mean over every k-subset (reference; cost C(n, k))."""
    count = math.comb(s.size, k)
    if count > ENUMERATE_LIMIT:
        raise ConfigError(
            f"expected at most {ENUMERATE_LIMIT} k-subsets for method='enumerate', got C({s.size},{k})="
            f"{count}; use method='auto' (exact) or 'mc'"
        )
    idx = np.array(list(itertools.combinations(range(s.size), k)), dtype=np.int64)  # [C, k]
    return float(_subset_returns(s, r, idx, beta).mean())


def _mc_return(s, r, k, beta, rng: np.random.Generator, n_subsets: int) -> tuple[float, float]:
    """Monte Carlo over n_subsets uniform k-subsets; returns (mean, standard error)."""
    out = []
    for start in range(0, n_subsets, 4096):
        b = min(4096, n_subsets - start)
        idx = np.argsort(rng.random((b, s.size)), axis=1)[:, :k]  # [b, k] uniform k-subsets
        out.append(_subset_returns(s, r, idx, beta))
    vals = np.concatenate(out)
    err = float(vals.std(ddof=1) / math.sqrt(vals.size)) if vals.size > 1 else math.inf
    return float(vals.mean()), err


def expected_return_with_error(
    scores,
    rewards,
    k: int,
    beta: float = 0.0,
    *,
    method: str = "auto",
    rng: np.random.Generator | None = None,
    n_subsets: int = 20_000,
    on_short: str = "clip",
) -> tuple[float, float]:
    """Expected reward of selecting by softmax(Q/beta) (argmax, ties uniform, at beta=0) among a
    uniformly random k-subset of one prompt's n samples; returns (value, standard error).

    method="auto": exact (closed form at beta=0, quadrature at beta>0; stderr 0.0, numerical error
    below ~1e-12 of the reward range); "enumerate": every k-subset (C(n,k) <= ENUMERATE_LIMIT);
    "mc": n_subsets random subsets drawn from `rng` (default np.random.default_rng(0)), with its
    standard error. n < k: all n samples are candidates (on_short="clip") or ConfigError ("raise").
    """
    s, r = _prompt_arrays(scores, rewards)
    beta = _check_beta(beta)
    k = _effective_k(s.size, k, on_short)
    if method == "auto":
        if beta == 0.0:
            return _argmax_return(s, r, k), 0.0
        if k == 1 or np.ptp(r) == 0.0:
            return float(r.mean()), 0.0
        return _quadrature_return(s, r, k, beta), 0.0
    if method == "enumerate":
        return _enumerate_return(s, r, k, beta), 0.0
    if method == "mc":
        n_subsets = _check_int("n_subsets", n_subsets, 2)
        return _mc_return(s, r, k, beta, rng if rng is not None else np.random.default_rng(0), n_subsets)
    raise ConfigError(f"expected method in {METHODS}, got {method!r}")


def expected_return(scores, rewards, k: int, beta: float = 0.0, **options) -> float:
    """Exact expected return of the Q-probe policy over random k-subsets (see
    `expected_return_with_error` for the options); the headline estimator."""
    return expected_return_with_error(scores, rewards, k, beta, **options)[0]


def expected_return_many(
    scores_list: Sequence, rewards_list: Sequence, k: int, beta: float = 0.0, **options
) -> np.ndarray:
    """`expected_return` for each prompt (lists of 1-D arrays; prompts may differ in n) -> [P]."""
    if len(scores_list) != len(rewards_list):
        raise ConfigError(
            f"expected one rewards array per scores array, got {len(scores_list)} and {len(rewards_list)}"
        )
    return np.array(
        [expected_return(s, r, k, beta, **options) for s, r in zip(scores_list, rewards_list, strict=True)],
        dtype=np.float64,
    )


def group_expected_return(scores, rewards, groups, k: int, beta: float = 0.0, **options):
    """`expected_return` per prompt from flat arrays with a prompt id per sample.

    Returns (ids, values): the distinct ids in order of first appearance and one value per id.
    """
    s = np.asarray(scores, dtype=np.float64)
    r = np.asarray(rewards, dtype=np.float64)
    g = np.asarray(groups)
    if not (s.ndim == 1 and s.shape == r.shape == g.shape):
        raise ConfigError(
            f"expected flat scores, rewards and groups of equal length, got {s.shape}, {r.shape}, {g.shape}"
        )
    ids, first, inverse = np.unique(g, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # groups in order of first appearance
    rows = np.argsort(inverse, kind="stable")  # rows grouped by sorted id, storage order within
    bounds = np.cumsum(np.bincount(inverse, minlength=ids.size))[:-1]
    parts = np.split(rows, bounds)
    values = expected_return_many(
        [s[parts[i]] for i in order], [r[parts[i]] for i in order], k, beta, **options
    )
    return ids[order], values


# ------------------------------------------------------------------------ paper's estimator
def paper_chunk_return(scores, rewards, k: int, beta: float, rng: np.random.Generator) -> float:
    """PAPER.md Evaluation: one shuffle, floor(n/k) disjoint chunks of k, mean over chunks of
    sum_i softmax(Q/beta)_i r_i (argmax with ties uniform at beta=0). Leftover samples are unused;
    n < k gives one chunk of all n. Unbiased for `expected_return`, but noisy."""
    s, r = _prompt_arrays(scores, rewards)
    beta = _check_beta(beta)
    k = _effective_k(s.size, k, "clip")
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(f"expected rng to be a numpy.random.Generator, got {type(rng).__name__}")
    chunks = s.size // k
    idx = rng.permutation(s.size)[: chunks * k].reshape(chunks, k)  # [chunks, k]
    return float(_subset_returns(s, r, idx, beta).mean())
