"""Runs, probe methods, cross-validation and per-prompt values for the Table 1 / Figures 2-4
reproduction (`report.py` is the driver, `render.py` writes the report).

A `Split` is one run restricted to the prompts that have all n samples scored, with features read
lazily per key. A `Method` says how to turn training samples into scores: a loss, a recipe, feature
keys (several are concatenated), optionally within-prompt centring or an ensemble of z-scored
members. Every method is evaluated with the exact expected return of softmax(Q/beta) selection over
random k-subsets (`qprobe.metrics.group_expected_return`), one value per prompt, averaged over seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.evaluation.evaluate import RunData
from qprobe.metrics import group_expected_return, pass_at_k
from qprobe.store.run import Run

LOSSES = ("mse", "ce", "pg")


# ------------------------------------------------------------------------------------ data
class _FeatureCache:
    """Feature arrays of one run's kept rows, read once per key (float32)."""

    def __init__(self, run: Run, rows: np.ndarray) -> None:
        self.run, self.rows, self.arrays = run, rows, {}

    def get(self, key: str) -> np.ndarray:
        if key not in self.arrays:
            self.arrays[key] = np.asarray(self.run.features(key, self.rows), dtype=np.float32)  # [N, d]
        return self.arrays[key]


@dataclass
class Split:
    """The complete prompts of one run: prompt id and reward per sample, features on demand."""

    name: str
    path: str
    n: int  # target samples per prompt
    prompt_ids: np.ndarray  # [N] object
    rewards: np.ndarray  # [N] float64
    index: np.ndarray  # [N] rows into the cache's arrays
    cache: _FeatureCache
    dropped: int = 0  # prompts left out because not all n samples are scored

    @classmethod
    def load(cls, path: str | Path, name: str) -> Split:
        data = RunData.load(str(path))
        ids, counts = np.unique(data.prompt_ids, return_counts=True)
        n = int(data.run.manifest.get("n") or counts.max())
        full = ids[counts >= n]
        keep = np.nonzero(np.isin(data.prompt_ids, full))[0]
        cache = _FeatureCache(data.run, data.rows[keep])
        return cls(name, str(path), n, data.prompt_ids[keep], data.rewards[keep], np.arange(keep.size), cache,
                   dropped=int(ids.size - full.size))

    @property
    def keys(self) -> list[str]:
        run = self.cache.run
        return [k for k in run.feature_keys if run.feature_spec(k).pooling != "tokens"]

    @property
    def model(self) -> str:
        return str(self.cache.run.manifest.get("model", {}).get("model", "?"))

    def features(self, keys: tuple[str, ...]) -> np.ndarray:
        return np.concatenate([self.cache.get(k)[self.index] for k in keys], axis=1)  # [N, sum d]

    def prompts(self) -> list[str]:
        return list(dict.fromkeys(self.prompt_ids.tolist()))

    def column(self, name: str) -> list[Any]:
        """One stored column (e.g. completion, details) for this split's rows, in its order."""
        return self.cache.run.table([name]).column(name).take(self.cache.rows[self.index]).to_pylist()

    def subset(self, prompts: list[str] | np.ndarray, name: str | None = None) -> Split:
        keep = np.isin(self.prompt_ids, np.asarray(list(prompts), dtype=object))
        return replace(self, name=name or self.name, prompt_ids=self.prompt_ids[keep], rewards=self.rewards[keep],
                       index=self.index[keep])

    def __len__(self) -> int:
        return int(self.rewards.size)


# -------------------------------------------------------------------------- per-prompt values
def probe_values(split: Split, scores: np.ndarray, k: int, beta: float) -> dict[str, float]:
    """Per prompt: exact expected reward of softmax(Q/beta) selection among k random samples."""
    ids, vals = group_expected_return(scores, split.rewards, split.prompt_ids, k, beta)
    return {str(p): float(v) for p, v in zip(ids, vals, strict=True)}


def seed_values(split: Split, scores: list[np.ndarray], k: int, beta: float) -> dict[str, float]:
    """`probe_values` averaged over the probes of several seeds (one per entry of `scores`)."""
    per_seed = [probe_values(split, s, k, beta) for s in scores]
    return {p: float(np.mean([v[p] for v in per_seed])) for p in per_seed[0]}


def mean_reward_values(split: Split) -> dict[str, float]:
    """pass@1 per prompt (for a greedy run: its one sample's reward)."""
    out: dict[str, list[float]] = {}
    for p, r in zip(split.prompt_ids, split.rewards, strict=True):
        out.setdefault(str(p), []).append(float(r))
    return {p: float(np.mean(v)) for p, v in out.items()}


def pass_k_values(split: Split, k: int) -> dict[str, float]:
    """Unbiased pass@k per prompt (Chen et al. 2021); a reward >= 1 is a pass."""
    out: dict[str, list[float]] = {}
    for p, r in zip(split.prompt_ids, split.rewards, strict=True):
        out.setdefault(str(p), []).append(float(r))
    return {p: pass_at_k(len(v), int(np.sum(np.asarray(v) >= 1)), min(k, len(v))) for p, v in out.items()}


def group_mean(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each row replaced by the mean of its prompt's rows (x: [N] or [N, d])."""
    _, inv = np.unique(groups, return_inverse=True)
    counts = np.bincount(inv).astype(np.float64)  # [P]
    if x.ndim == 1:
        return (np.bincount(inv, weights=x) / counts)[inv]  # [N]
    sums = np.zeros((counts.size, x.shape[1]))
    np.add.at(sums, inv, x)
    return (sums / counts[:, None])[inv].astype(x.dtype)  # [N, d]


# ---------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """How to score samples. `members`: an ensemble (mean of z-scored member scores, each member
    trained with the same seed); `seed_ensemble`: that many probes of this method averaged."""

    name: str
    loss: str = "pg"
    recipe: str = "fast"
    keys: tuple[str, ...] = ()
    arch: str = "linear"
    width: int = 64
    standardize: bool | None = None
    centre: bool = False  # train on within-prompt centred features and rewards (linear only)
    pca: int = 0  # project on the top principal axes of within-prompt variation first
    l2_grid: tuple[float, ...] | None = None
    patience: int = 1
    loss_options: tuple[tuple[str, Any], ...] = ()
    members: tuple[Method, ...] = ()
    seed_ensemble: int = 0
    note: str = field(default="", compare=False)

    def make_probe(self, seed: int, k: int, beta: float) -> Any:
        from qprobe.probes.models import LinearProbe, MLPProbe
        from qprobe.probes.train import TrainConfig

        opts: dict[str, Any] = {"recipe": self.recipe, "k": k, "beta": beta, "patience": self.patience}
        if self.l2_grid is not None:
            opts["l2_grid"] = self.l2_grid
        common = dict(loss=self.loss, loss_options=dict(self.loss_options), train=TrainConfig(**opts),
                      standardize=self.standardize, seed=seed)
        if self.arch == "mlp":
            return MLPProbe(depth=1, width=self.width, **common)
        return LinearProbe(**common)


def fit_scores(m: Method, train: Split, evals: dict[str, Split], seed: int, k: int, beta: float) -> dict[str, np.ndarray]:
    """Train `m` (one seed) on `train`; its scores [N] on each split of `evals`."""
    if m.members or m.seed_ensemble:
        parts = ([(mm, seed) for mm in m.members] if m.members else
                 [(replace(m, seed_ensemble=0), seed * m.seed_ensemble + j) for j in range(m.seed_ensemble)])
        out = {name: np.zeros(len(s)) for name, s in evals.items()}
        for member, s in parts:
            sc = fit_scores(member, train, {**evals, "__fit__": train}, s, k, beta)
            mu, sd = sc["__fit__"].mean(), sc["__fit__"].std()
            sd = sd if sd > 0 else 1.0
            for name in sc.keys() & out.keys():
                out[name] += (sc[name] - mu) / sd / len(parts)  # z-scored by the training scores
        return {name: v for name, v in out.items() if name in sc}
    x, r, g = train.features(m.keys), train.rewards, train.prompt_ids  # [N, d], [N], [N]
    project = within_prompt_pca(x, g, m.pca) if m.pca else (lambda z: z)
    x = project(x)
    if m.centre:  # a linear probe's within-prompt ranking is unchanged by per-prompt offsets
        x, r = x - group_mean(x, g), r - group_mean(r, g)
    probe = m.make_probe(seed, k, beta).fit(x, r, g)
    return {name: probe.score(project(s.features(m.keys))).astype(np.float64) for name, s in evals.items()
            if set(m.keys) <= set(s.keys)}  # a split without these features gets no scores


def within_prompt_pca(x: np.ndarray, groups: np.ndarray, dim: int) -> Any:
    """A projection of standardised features on the `dim` top principal axes of their variation
    within prompts (what reranking among one prompt's samples can use), fitted on training rows."""
    mu = x.mean(axis=0)  # [d]
    sd = np.maximum(x.std(axis=0), 1e-6)  # [d]
    z = (x - mu) / sd  # [N, d]
    _, _, vt = np.linalg.svd(z - group_mean(z, groups), full_matrices=False)  # vt: [min(N, d), d]
    axes = vt[:dim].T.astype(np.float32)  # [d, dim]
    return lambda f: ((f - mu) / sd).astype(np.float32) @ axes  # [N, dim]


class Fits:
    """Scores of every (method, seed, training prompts) fitted so far, so that one probe serves
    every k, beta and figure."""

    def __init__(self, train: Split, evals: dict[str, Split], k: int, beta: float) -> None:
        self.train, self.evals, self.k, self.beta = train, evals, k, beta
        self.store: dict[tuple[Method, int, int | None], dict[str, np.ndarray]] = {}
        self.fitted = 0

    def scores(self, m: Method, seed: int, n_prompts: int | None = None) -> dict[str, np.ndarray]:
        """Scores on the eval splits (and "__train__"); n_prompts: train on a seeded random subset."""
        key = (m, seed, n_prompts)
        if key not in self.store:
            train = self.train
            if n_prompts is not None and n_prompts < len(train.prompts()):
                pick = np.random.default_rng(10_000 + seed).permutation(len(train.prompts()))[:n_prompts]
                train = train.subset([train.prompts()[i] for i in pick])
            self.store[key] = fit_scores(m, train, {**self.evals, "__train__": self.train}, seed, self.k, self.beta)
            self.fitted += 1
        return self.store[key]

    def values(self, m: Method, seeds: int, split: str, k: int, beta: float,
               n_prompts: int | None = None) -> dict[str, float] | None:
        """Per prompt of eval split `split`: expected return at (k, beta) averaged over seeds (None
        when the split lacks the method's features)."""
        if split not in self.scores(m, 0, n_prompts):
            return None
        target = self.train if split == "__train__" else self.evals[split]
        return seed_values(target, [self.scores(m, s, n_prompts)[split] for s in range(seeds)], k, beta)


def cv_return(m: Method, train: Split, k: int, beta: float, folds: int = 4, seeds: int = 2) -> float:
    """Mean held-out expected return over `folds` folds of the training prompts x `seeds` seeds:
    the training-data-only criterion used to choose layers and the final method."""
    prompts = train.prompts()
    folds = max(2, min(folds, len(prompts)))
    fold_of = np.random.default_rng(0).permutation(len(prompts)) % folds
    vals = []
    for f in range(folds):
        held = [p for p, q in zip(prompts, fold_of, strict=True) if q == f]
        inner = train.subset([p for p, q in zip(prompts, fold_of, strict=True) if q != f])
        test = train.subset(held)
        for s in range(seeds):
            sc = fit_scores(m, inner, {"held": test}, s, k, beta)["held"]
            vals.extend(probe_values(test, sc, k, beta).values())
    return float(np.mean(vals))
