"""Preference evaluation (paper section 7): pairwise accuracy and the data-size curve (Figure 6).

Pairwise accuracy counts a pair 1 when the probe scores the chosen response higher, 0 when lower
and 1/2 on a tie (EX-RM vs IM-RM's convention); its interval is a bootstrap over pairs. It equals
the expected return of best-of-2 selection by the probe on a pairs run (k = 2, beta = 0).

`learning_curve` retrains each probe on growing fractions of the training pairs (nested random
subsets, one per seed) and measures accuracy on fixed test pairs: Figure 6 of the paper plotted
win rate against the fraction used for a linear probe and 2- and 3-layer MLPs (MLPProbe depth 1
and 2) and found that the MLPs overfit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.errors import ConfigError
from qprobe.intervals import bootstrap_ci, paired_bootstrap_ci

FeaturePairs = tuple[np.ndarray, np.ndarray]  # (chosen [P, d], rejected [P, d])


def pairwise_outcomes(chosen_scores: np.ndarray, rejected_scores: np.ndarray) -> np.ndarray:
    """Per pair: 1 if the chosen response scores higher, 0 if lower, 0.5 on a tie. [P]"""
    c = np.asarray(chosen_scores, dtype=np.float64)
    r = np.asarray(rejected_scores, dtype=np.float64)
    if c.shape != r.shape or c.ndim != 1:
        raise ConfigError(f"expected chosen and rejected scores of the same shape [P], got {c.shape} and {r.shape}")
    return np.where(c > r, 1.0, np.where(c < r, 0.0, 0.5))


@dataclass(frozen=True)
class Accuracy:
    """Pairwise accuracy with a 95% bootstrap interval over pairs."""

    mean: float
    low: float
    high: float
    n_pairs: int
    ties: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}] ({self.n_pairs} pairs, {self.ties} ties)"

    def to_dict(self) -> dict[str, float]:
        return {"accuracy": self.mean, "low": self.low, "high": self.high, "pairs": self.n_pairs, "ties": self.ties}


def accuracy(outcomes: np.ndarray, rng: np.random.Generator | None = None, n_resamples: int = 9999) -> Accuracy:
    """Mean of per-pair outcomes and its bootstrap interval (seeded: reports are reproducible)."""
    v = np.asarray(outcomes, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ConfigError(f"expected per-pair outcomes [P] with P >= 1, got shape {v.shape}")
    ties = int(np.sum(v == 0.5))
    if v.size < 2:
        return Accuracy(float(v.mean()), float(v.mean()), float(v.mean()), int(v.size), ties)
    m, lo, hi = bootstrap_ci(v, n_resamples=n_resamples, rng=rng if rng is not None else np.random.default_rng(0))
    return Accuracy(float(m), float(lo), float(hi), int(v.size), ties)


def accuracy_difference(a: np.ndarray, b: np.ndarray, rng: np.random.Generator | None = None) -> tuple[float, float, float]:
    """Mean of a - b over the same pairs with a paired bootstrap interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = a - b
    if d.size < 2 or np.all(d == d[0]):
        m = float(d.mean()) if d.size else float("nan")
        return m, m, m
    m, lo, hi = paired_bootstrap_ci(a, b, rng=rng if rng is not None else np.random.default_rng(0))
    return float(m), float(lo), float(hi)


def normalised_margin(chosen_scores: np.ndarray, rejected_scores: np.ndarray) -> float:
    """mean |r_c - r_r| / std(all 2P rewards) (EX-RM vs IM-RM's normalised margin; 0 when all are equal)."""
    c = np.asarray(chosen_scores, dtype=np.float64)
    r = np.asarray(rejected_scores, dtype=np.float64)
    pairwise_outcomes(c, r)  # the same shape checks
    std = float(np.concatenate([c, r]).std())
    return float(np.abs(c - r).mean() / std) if std > 0 else 0.0


def probe_outcomes(probe: Any, pairs: FeaturePairs, spec: Any = None) -> np.ndarray:
    """Per-pair outcomes of a fitted probe on (chosen, rejected) features ([P] in {0, 0.5, 1})."""
    chosen, rejected = pairs
    return pairwise_outcomes(probe.score(chosen, spec), probe.score(rejected, spec))


def run_outcomes(probe: Any, run: Any) -> tuple[list[str], np.ndarray]:
    """(pair ids, outcomes) of a probe on a pairs run, on the run's features matching its spec."""
    from qprobe.evaluation.evaluate import feature_key_for
    from qprobe.store.pairs import read_pairs

    rows = read_pairs(run)
    key = feature_key_for(rows.run, probe.feature_spec_) if probe.feature_spec_ is not None else rows.run.feature_keys[0]
    return rows.ids, probe_outcomes(probe, rows.features(key), rows.run.feature_spec(key))


def split_indices(n: int, test_frac: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of n pairs: round(test_frac * n) random pairs held out (at least one)."""
    if not 0.0 < test_frac < 1.0 or n < 2:
        raise ConfigError(f"expected 0 < test_frac < 1 and at least 2 pairs, got {test_frac} and {n}")
    n_test = min(max(int(round(test_frac * n)), 1), n - 1)
    perm = rng.permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def subset(pairs: FeaturePairs, idx: np.ndarray) -> FeaturePairs:
    return pairs[0][idx], pairs[1][idx]


# ------------------------------------------------------------------------- Figure 6: data size
ProbeFactory = Callable[[int], Any]  # seed -> an unfitted probe


def learning_curve(train: FeaturePairs, test: FeaturePairs, fractions: list[float],
                   probes: dict[str, ProbeFactory], seeds: int = 3, rng: np.random.Generator | None = None,
                   spec: Any = None) -> dict[str, Any]:
    """Test accuracy of each probe trained on each fraction of the training pairs.

    For every seed one random order of the training pairs is drawn and fraction f uses its first
    ceil(f * P) pairs (nested subsets), so the curves differ by data size only. Returns
    {"fractions", "n_train", "curves": {name: [mean over seeds per fraction]}, "per_seed": {name:
    [[acc per seed] per fraction]}, "test": {name: Accuracy dict at fraction 1 (seed 0)}}."""
    fr = [float(f) for f in fractions]
    if not fr or any(not 0.0 < f <= 1.0 for f in fr):
        raise ConfigError(f"expected fractions in (0, 1], got {fractions}")
    if seeds < 1:
        raise ConfigError(f"expected seeds >= 1, got {seeds}")
    rng = rng if rng is not None else np.random.default_rng(0)
    p = train[0].shape[0]
    sizes = [max(2, int(np.ceil(f * p))) for f in fr]
    orders = [rng.permutation(p) for _ in range(seeds)]
    per_seed: dict[str, list[list[float]]] = {name: [[] for _ in fr] for name in probes}
    at_full: dict[str, dict[str, float]] = {}
    for name, make in probes.items():
        for s, order in enumerate(orders):
            for i, n in enumerate(sizes):
                probe = make(s).fit(pairs=subset(train, order[:n]), spec=spec)
                out = probe_outcomes(probe, test)
                per_seed[name][i].append(float(out.mean()))
                if s == 0 and i == len(sizes) - 1:
                    at_full[name] = accuracy(out).to_dict()
    return {
        "fractions": fr, "n_train": sizes, "n_test": int(test[0].shape[0]),
        "curves": {name: [float(np.mean(v)) for v in rows] for name, rows in per_seed.items()},
        "per_seed": per_seed, "test": at_full,
    }


def plot_learning_curve(result: dict[str, Any], path: str | Path, title: str = "") -> bool:
    """Accuracy against the fraction of training pairs, one line per probe (min-max band over
    seeds); False when matplotlib is missing."""
    from qprobe.evaluation.plots import new_axes, save

    axes = new_axes()
    if axes is None:
        return False
    fig, ax = axes
    x = result["fractions"]
    for name, ys in result["curves"].items():
        seeds = np.array(result["per_seed"][name])  # [F, seeds]
        ax.plot(x, ys, marker="o", ms=3, label=name)
        ax.fill_between(x, seeds.min(axis=1), seeds.max(axis=1), alpha=0.15)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(f"fraction of training pairs used (of {max(result['n_train'])})")
    ax.set_ylabel(f"test pairwise accuracy ({result['n_test']} pairs)")
    save(fig, ax, title, path)
    return True
