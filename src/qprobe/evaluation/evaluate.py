"""Evaluate selection methods on a stored run: per-prompt values, then bootstrap CIs over prompts.

Every method is reduced to one number per prompt (its expected reward), so methods compare
on the same prompts with a paired bootstrap. Probe methods use the exact expected return of
best-of-k over all k-subsets of the stored samples (`qprobe.metrics.group_expected_return`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qprobe.errors import DataError, SpecMismatchError, StoreError
from qprobe.intervals import bootstrap_ci, paired_bootstrap_ci
from qprobe.metrics import group_expected_return, pass_at_k
from qprobe.store.run import Run


@dataclass
class RunData:
    """The scored rows of a run: prompt ids, rewards, and the row numbers they came from."""

    run: Run
    rows: np.ndarray  # [N] row numbers in storage order
    prompt_ids: np.ndarray  # [N]
    rewards: np.ndarray  # [N]
    unscored: int = 0  # rows of the run left out: reward null (a sandbox error, an unscored task)

    @classmethod
    def load(cls, run: Run | str) -> RunData:
        run = run if isinstance(run, Run) else Run.open(run)
        t = run.table(["prompt_id", "reward"])
        rewards = np.array([np.nan if r is None else r for r in t.column("reward").to_pylist()], dtype=float)
        keep = np.nonzero(~np.isnan(rewards))[0]
        if len(keep) == 0:
            raise StoreError(f"expected scored samples in run {run.path}, got none; collect with a reward")
        ids = np.array(t.column("prompt_id").to_pylist(), dtype=object)
        return cls(run, keep, ids[keep], rewards[keep], int(len(rewards) - len(keep)))

    def only(self, prompt_ids: list[str]) -> RunData:
        """The rows of these prompts only; an id the run does not hold is an error, not skipped."""
        have = set(self.prompt_ids.tolist())
        missing = [p for p in dict.fromkeys(prompt_ids) if p not in have]
        if missing:
            raise DataError(
                f"expected every listed prompt id in the scored rows of run {self.run.path}, got {len(missing)} "
                f"not there (e.g. {missing[:3]}); list ids as `qprobe export` shows them"
            )
        keep = np.isin(self.prompt_ids, list(prompt_ids))
        return RunData(self.run, self.rows[keep], self.prompt_ids[keep], self.rewards[keep], self.unscored)

    def prompt_hashes(self) -> dict[str, str]:
        """prompt id -> hash of the prompt text the model saw (`qprobe.store.run.prompt_hash`)."""
        from qprobe.store.run import prompt_hash

        t = self.run.table(["prompt_id", "prompt"])
        wanted = set(self.prompt_ids.tolist())
        return {p: prompt_hash(x) for p, x in zip(t.column("prompt_id").to_pylist(), t.column("prompt").to_pylist(),
                                                  strict=True) if p in wanted}

    def features(self, key: str) -> np.ndarray:
        return self.run.features(key, self.rows)  # [N, d]

    def prompts(self) -> list[str]:
        return list(dict.fromkeys(self.prompt_ids.tolist()))

    def completions(self) -> list[str]:
        """The completion text of each kept row."""
        texts = self.run.table(["completion"]).column("completion").to_pylist()
        return [texts[i] for i in self.rows]


def run_prompt_hashes(run: Run) -> dict[str, str]:
    """prompt id -> hash of its prompt text, for every row of a run (sampled or pairs)."""
    from qprobe.store.run import prompt_hash

    t = run.table(["prompt_id", "prompt"])
    return {p: prompt_hash(x) for p, x in zip(t.column("prompt_id").to_pylist(), t.column("prompt").to_pylist(),
                                              strict=True)}


def check_overlap(probe: Any, data: RunData | dict[str, str], name: str, allow: bool = False) -> str:
    """Refuse (DataError) a probe whose training prompts include evaluated ones, compared by the hash
    of the prompt text (so a copy or a re-collection of the same prompts counts); with `allow`, or
    for a probe that records no training prompts, return a note to print instead ("" when clean).
    `data`: the evaluated rows, or their {prompt id: hash} (`run_prompt_hashes`)."""
    trained = set((getattr(probe, "source_", {}) or {}).get("train_prompts", {}).get("hashes", []))
    if not trained:
        return (f"note: probe {name} records no training prompts (trained before qprobe recorded them): "
                "cannot check that it was not trained on the evaluated prompts")
    hashes = data if isinstance(data, dict) else data.prompt_hashes()
    overlap = sorted(p for p, h in hashes.items() if h in trained)
    if not overlap:
        return ""
    what = (f"probe {name} was trained on {len(overlap)} of the {len(hashes)} evaluated prompts "
            f"(e.g. {overlap[:3]})")
    if allow:
        return f"note: {what}; its figures are not held-out (--allow-overlap)"
    raise DataError(f"expected a probe trained on other prompts than the evaluated ones, got: {what}; "
                    "evaluate on another split, list held-out prompts with --prompts, or pass --allow-overlap")


def feature_key_for(run: Run, spec: Any) -> str:
    """The run's feature array that matches a probe's spec, or SpecMismatchError naming both."""
    errors = []
    for key in run.feature_keys:
        try:
            spec.check_compatible(run.feature_spec(key))
            return key
        except SpecMismatchError as exc:
            errors.append(str(exc))
    found = "; ".join(run.feature_spec(k).describe() for k in run.feature_keys) or "none"
    raise SpecMismatchError(
        f"expected features {spec.describe()} in run {run.path}, got {found}; "
        "collect the run with the probe's --feature, or train a probe on the run's features"
    )


def probe_scores(data: RunData, probe: Any) -> np.ndarray:
    key = feature_key_for(data.run, probe.feature_spec_)
    return np.asarray(probe.score(data.features(key)), dtype=np.float64)  # [N]


def probe_values(data: RunData, scores: np.ndarray, k: int, beta: float = 0.0) -> dict[str, float]:
    """Per prompt: the exact expected reward of picking from k random samples by softmax(Q/beta)."""
    ids, values = group_expected_return(scores, data.rewards, data.prompt_ids, k, beta)
    return dict(zip(ids, np.asarray(values, dtype=float), strict=False))


def mean_reward_values(data: RunData) -> dict[str, float]:
    """pass@1: the expected reward of one random sample, per prompt."""
    out: dict[str, list[float]] = {}
    for p, r in zip(data.prompt_ids, data.rewards, strict=False):
        out.setdefault(p, []).append(float(r))
    return {p: float(np.mean(v)) for p, v in out.items()}


def is_binary(rewards: np.ndarray) -> bool:
    """Whether every reward is 0 or 1 (pass/fail): then best-of-k's skyline is the unbiased pass@k."""
    r = np.asarray(rewards, dtype=float)
    return bool(np.all((r == 0.0) | (r == 1.0)))


def skyline_name(data: RunData, k: int) -> str:
    return f"pass@{k}" if is_binary(data.rewards) else f"oracle best-of-{k}"


def pass_at_k_values(data: RunData, k: int) -> dict[str, float]:
    """The skyline per prompt: the unbiased pass@k for 0/1 rewards, else the exact expected best
    reward among k random samples (`oracle_values`); a reward of 0.7 is not a pass, nor a fail."""
    if not is_binary(data.rewards):
        return oracle_values(data, k)
    out: dict[str, list[float]] = {}
    for p, r in zip(data.prompt_ids, data.rewards, strict=False):
        out.setdefault(p, []).append(float(r))
    return {p: pass_at_k(len(v), int(np.sum(np.asarray(v) == 1)), min(k, len(v))) for p, v in out.items()}


def oracle_values(data: RunData, k: int) -> dict[str, float]:
    """Best-of-k with the true reward as the score (the skyline for real-valued rewards)."""
    return probe_values(data, data.rewards, k, 0.0)


@dataclass
class MethodResult:
    name: str
    mean: float
    low: float
    high: float
    n_prompts: int
    per_prompt: dict[str, float]

    def row(self) -> list[Any]:
        return [self.name, self.mean, self.low, self.high, self.n_prompts]

    def to_json(self) -> dict[str, Any]:
        """{mean, low, high, n_prompts, per_prompt}: what evaluation files store (the name is their key)."""
        return {"mean": self.mean, "low": self.low, "high": self.high, "n_prompts": self.n_prompts,
                "per_prompt": self.per_prompt}

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> MethodResult | None:
        """The inverse of `to_json`; None for a record without per-problem values (older files)."""
        if not d.get("per_prompt"):
            return None
        return cls(name, d["mean"], d["low"], d["high"], d["n_prompts"], d["per_prompt"])


def method_result(name: str, per_prompt: dict[str, float], prompts: list[str] | None = None,
                  rng: np.random.Generator | None = None) -> MethodResult:
    """Mean over prompts with a 95% bootstrap interval (prompts: the common set to use)."""
    keys = prompts if prompts is not None else list(per_prompt)
    missing = [p for p in keys if p not in per_prompt]
    if missing:
        raise DataError(f"expected a value of {name} for every prompt compared, got none for {len(missing)} "
                        f"(e.g. {missing[:3]}); evaluate runs of the same prompts, or list the common ones with --prompts")
    used = {p: per_prompt[p] for p in keys}  # the paired gains use exactly these prompts, too
    v = np.array(list(used.values()), dtype=float)
    if len(v) < 2:
        m = float(v.mean()) if len(v) else float("nan")
        return MethodResult(name, m, m, m, len(v), used)
    m, lo, hi = bootstrap_ci(v, rng=rng if rng is not None else np.random.default_rng(0))
    return MethodResult(name, float(m), float(lo), float(hi), len(v), used)


def paired_difference(a: MethodResult, b: MethodResult, rng: np.random.Generator | None = None) -> tuple[float, float, float]:
    """Mean of a - b over their common prompts, with a paired bootstrap interval."""
    common = [p for p in a.per_prompt if p in b.per_prompt]
    x = np.array([a.per_prompt[p] for p in common])
    y = np.array([b.per_prompt[p] for p in common])
    if len(common) < 2 or np.all(x - y == (x - y)[0]):
        d = float(np.mean(x - y)) if len(common) else float("nan")
        return d, d, d
    d, lo, hi = paired_bootstrap_ci(x, y, rng=rng if rng is not None else np.random.default_rng(0))
    return float(d), float(lo), float(hi)


def format_table(results: list[MethodResult], baseline: MethodResult | None = None) -> str:
    """A plain-text table: method, mean [95% CI], and the paired gain over the baseline."""
    head = f"{'method':<26} {'mean':>7}  {'95% CI':<17} {'prompts':>7}"
    if baseline is not None:
        head += f"  {'vs ' + baseline.name:>24}"
    lines = [head, "-" * len(head)]
    for r in results:
        line = f"{r.name:<26} {r.mean:7.4f}  [{r.low:.4f}, {r.high:.4f}] {r.n_prompts:7d}"
        if baseline is not None and r is not baseline:
            d, lo, hi = paired_difference(r, baseline)
            line += f"  {d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
        lines.append(line)
    return "\n".join(lines)
