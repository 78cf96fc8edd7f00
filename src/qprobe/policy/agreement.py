"""Agreement among the k candidates, added to the probe's value (beyond the paper).

Completions that many of the other candidates resemble tend to be right (self-consistency, MBR
decoding). With `PolicyConfig(consensus=lam)` the policy scores candidate i of the set S by

    Q(x, a_i) + lam * mean_{j in S, j != i} sim(a_i, a_j)

where sim is the Jaccard similarity of the completions' token sets (words and punctuation), then
picks by softmax(score / beta) as usual. The score depends on the whole set, so the expected return
over random k-subsets has no closed form; qprobe.evaluation.consensus_return computes it by enumeration.
On the 0.5B default model this closes about a third of the pass@1 -> pass@8 gap on HumanEval
(benchmarks/repro/REPORT.md), more than any probe alone.
"""

from __future__ import annotations

import re

import numpy as np

_TOKEN = re.compile(r"\w+|[^\w\s]")


def token_set(text: str) -> frozenset[str]:
    """The distinct words and punctuation marks of a completion."""
    return frozenset(_TOKEN.findall(text))


def jaccard_matrix(texts: list[str]) -> np.ndarray:
    """[k, k] Jaccard similarity |A & B| / |A | B| of the token sets (1 on the diagonal; two empty texts: 0)."""
    sets = [token_set(t) for t in texts]
    return np.array([[len(a & b) / max(1, len(a | b)) for b in sets] for a in sets], dtype=np.float64)


def agreement(sim: np.ndarray) -> np.ndarray:
    """Mean similarity of each candidate to the other members of its set: sim [..., k, k] -> [..., k];
    zeros when k = 1."""
    s = np.asarray(sim, dtype=np.float64)
    k = s.shape[-1]
    if k < 2:
        return np.zeros(s.shape[:-1])
    diag = np.diagonal(s, axis1=-2, axis2=-1)  # [..., k]
    return (s.sum(axis=-1) - diag) / (k - 1)  # [..., k]


def consensus_scores(q: np.ndarray, texts: list[str], weight: float) -> np.ndarray:
    """Q + weight * agreement among `texts` (the candidates' completions), [k]."""
    q = np.asarray(q, dtype=np.float64)  # [k]
    if weight == 0.0:
        return q
    return q + weight * agreement(jaccard_matrix(texts))
