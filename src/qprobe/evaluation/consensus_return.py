"""Expected return of the consensus policy (`PolicyConfig(consensus=w)`, policy/agreement.py).

The score of a candidate depends on the other members of its set (Q + w x mean similarity to them),
so the closed forms of `qprobe.metrics` do not apply. The expected reward over a uniformly random
k-subset of a prompt's n stored samples is computed by enumerating all C(n, k) subsets while there
are at most `max_subsets` of them (12,870 for 8 of 16), else estimated from that many random subsets
drawn with the given generator (`candidate_sets` says which).
"""

from __future__ import annotations

import math
from functools import cache
from itertools import combinations

import numpy as np

from qprobe.errors import ConfigError
from qprobe.metrics import selection_probs
from qprobe.policy.agreement import agreement, jaccard_matrix

MAX_SUBSETS = 200_000


@cache
def all_subsets(n: int, k: int) -> np.ndarray:
    """Every k-subset of range(n), rows [C(n, k), k]."""
    return np.array(list(combinations(range(n), k)), dtype=np.int64).reshape(-1, k)


def candidate_sets(n: int, k: int, rng: np.random.Generator | None = None,
                   max_subsets: int = MAX_SUBSETS) -> tuple[np.ndarray, bool]:
    """(sets [M, k], exact): all k-subsets when there are at most max_subsets, else that many random ones."""
    k = min(k, n)
    if math.comb(n, k) <= max_subsets:
        return all_subsets(n, k), True
    if rng is None:
        raise ConfigError(f"expected an rng to sample subsets: C({n}, {k}) > {max_subsets} subsets to enumerate")
    return np.argsort(rng.random((max_subsets, n)), axis=1)[:, :k], False  # [M, k], uniform k-subsets


def consensus_return(q: np.ndarray, sim: np.ndarray, rewards: np.ndarray, k: int, beta: float, weight: float,
                     rng: np.random.Generator | None = None, max_subsets: int = MAX_SUBSETS) -> float:
    """Expected reward of softmax((Q + weight x agreement) / beta) over random k-subsets of one prompt's
    samples: q [n] probe values, sim [n, n] similarities, rewards [n]."""
    q, r = np.asarray(q, dtype=np.float64), np.asarray(rewards, dtype=np.float64)
    idx, _ = candidate_sets(q.size, k, rng, max_subsets)  # [M, k]
    agree = agreement(sim[idx[:, :, None], idx[:, None, :]]) if weight else 0.0  # [M, k]
    score = q[idx] + weight * agree  # [M, k], policy.agreement.consensus_scores on each set
    return float((selection_probs(score, beta) * r[idx]).sum(axis=1).mean())


def consensus_values(prompt_ids: np.ndarray, texts: list[str], q: np.ndarray, rewards: np.ndarray, k: int,
                     beta: float, weight: float, rng: np.random.Generator | None = None) -> dict[str, float]:
    """Per prompt: `consensus_return` with Jaccard similarity of the completions' token sets."""
    ids = np.asarray(prompt_ids, dtype=object)
    out = {}
    for p in dict.fromkeys(ids.tolist()):
        rows = np.nonzero(ids == p)[0]
        sim = jaccard_matrix([texts[i] for i in rows])  # [n, n]
        out[str(p)] = consensus_return(q[rows], sim, rewards[rows], k, beta, weight, rng)
    return out
