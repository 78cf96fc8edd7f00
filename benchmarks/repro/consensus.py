"""Push past the paper with a set-dependent score: Q-probe value plus agreement with the other candidates.

Among k candidates, completions that many others resemble tend to be right (self-consistency, MBR
decoding). The score of candidate i in the candidate set S is

    Q(x, a_i) + lam * mean_{j in S, j != i} sim(a_i, a_j)

and the policy picks by softmax(score / beta) (argmax at beta = 0) as for a plain Q-probe. Because
the score depends on the set, the closed forms of `qprobe.metrics` do not apply: the expected return
over random k-subsets of a prompt's n samples is computed exactly by enumerating all C(n, k) subsets
(12,870 for 8 of 16; `qprobe.evaluation.consensus_return`). `sim` is the Jaccard similarity of the
completions' token sets ("text") or the cosine of within-prompt centred features (a feature key).
lam and sim are chosen by cross-validation over MBPP-train prompts with out-of-fold probe values,
never on test numbers. The policy's side of
it (`PolicyConfig(consensus=lam)`, `qprobe select --consensus LAM`) is `qprobe.policy.agreement`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qprobe.evaluation.consensus_return import consensus_return
from qprobe.policy.agreement import jaccard_matrix

LAMBDAS = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
ONLY = 100.0  # "consensus only": the probe value is a tie-breaker


def cosine(x: np.ndarray) -> np.ndarray:
    """[n, n] cosine similarity of features centred on the prompt's mean."""
    z = x.astype(np.float64) - x.mean(axis=0)  # [n, d]
    z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-12
    return z @ z.T


class Similarities:
    """Per prompt of a split: its sample rows and their [n, n] similarity matrix, by kind."""

    def __init__(self, split: Any) -> None:
        self.split, self.cache = split, {}
        self.rows = {p: np.nonzero(split.prompt_ids == p)[0] for p in split.prompts()}

    def get(self, kind: str) -> dict[str, np.ndarray]:
        if kind not in self.cache:
            if kind == "text":
                texts = self.split.column("completion")
                self.cache[kind] = {p: jaccard_matrix([texts[i] for i in rows]) for p, rows in self.rows.items()}
            else:
                x = self.split.features((kind,))
                self.cache[kind] = {p: cosine(x[rows]) for p, rows in self.rows.items()}
        return self.cache[kind]


def values(sims: Similarities, kind: str, q: np.ndarray, k: int, beta: float, lam: float) -> dict[str, float]:
    """Per prompt: `consensus_return` with probe values q [N] (rows of the split)."""
    sp, s = sims.split, sims.get(kind)
    return {p: consensus_return(q[rows], s[p], sp.rewards[rows], k, beta, lam) for p, rows in sims.rows.items()}


def section(ex: Any, key: tuple[str, ...], kinds: tuple[str, ...]) -> dict[str, Any]:
    """CV over MBPP-train (out-of-fold pg values x kinds x LAMBDAS), then the chosen and a few fixed
    settings on the test splits, each averaged over probe seeds."""
    from methods import Method, fit_scores

    a, k, beta = ex.args, ex.k, ex.args.beta
    pg = Method("pg", keys=key)
    train, prompts = ex.train, ex.train.prompts()
    kinds = tuple(kd for kd in kinds if kd == "text" or kd in train.keys)
    folds = max(2, min(a.cv_folds, len(prompts)))
    fold_of = np.random.default_rng(0).permutation(len(prompts)) % folds
    oof = [np.zeros(len(train)) for _ in range(a.cv_seeds)]  # out-of-fold pg values per seed
    for f in range(folds):
        held = [p for p, q in zip(prompts, fold_of, strict=True) if q == f]
        mask = np.isin(train.prompt_ids, np.asarray(held, dtype=object))
        inner = train.subset([p for p in prompts if p not in set(held)])
        for s in range(a.cv_seeds):
            oof[s][mask] = fit_scores(pg, inner, {"held": train.subset(held)}, s, k, beta)["held"]
    tsims = Similarities(train)
    grid = [(kd, lam) for kd in kinds for lam in (*LAMBDAS, ONLY)]
    cv = {f"{kd} lam={lam:g}": float(np.mean([np.mean(list(values(tsims, kd, oof[s], k, beta, lam).values()))
                                              for s in range(a.cv_seeds)])) for kd, lam in grid}
    best = max(cv, key=cv.get)
    kind, lam = best.split(" lam=")[0], float(best.split(" lam=")[1])
    zero = {f"{kd} only": (kd, ONLY, True) for kd in kinds}
    settings = {f"pg + {lam:g} x consensus({kind}) [chosen by CV]": (kind, lam, False), **zero}
    tests: dict[str, Any] = {}
    sims_of = {split: Similarities(sp) for split, sp in ex.tests.items()}
    for name, (kd, lm, only) in settings.items():
        tests[name] = {}
        for split, sp in ex.tests.items():
            if kd != "text" and kd not in sp.keys:
                tests[name][split] = None
                continue
            sims = sims_of[split]
            per_seed = []
            for s in range(1 if only else a.seeds):
                q = np.zeros(len(sp)) if only else ex.fits.scores(pg, s)[split]
                per_seed.append(values(sims, kd, q, k, beta, lm))
            v = {p: float(np.mean([d[p] for d in per_seed])) for p in per_seed[0]}
            tests[name][split] = ex.row(split, v, k)
    return {"cv": cv, "best": best, "rows": tests, "lambdas": [*LAMBDAS, ONLY], "kinds": list(kinds),
            "criterion": f"{folds}-fold CV over MBPP-train prompts x {a.cv_seeds} seeds, out-of-fold pg values"}
