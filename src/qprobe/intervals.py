"""Confidence intervals over prompts: the bootstrap of a mean of per-prompt values, and the paired
bootstrap of a difference between two methods scored on the same prompts (scipy.stats.bootstrap)."""

from __future__ import annotations

import inspect
import math
import warnings

import numpy as np

from qprobe.errors import ConfigError


# ------------------------------------------------------------------------ confidence intervals
def _finite_1d(name: str, values) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size < 2 or not np.isfinite(x).all():
        raise ConfigError(
            f"expected {name} as a 1-D array of >= 2 finite per-prompt values, got shape {x.shape}"
            + ("" if x.ndim != 1 or x.size < 2 else " with NaN or inf")
        )
    return x


def _bootstrap_mean(x: np.ndarray, confidence: float, n_resamples: int, rng, method: str):
    from scipy import stats

    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"expected 0 < confidence < 1, got {confidence!r}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ConfigError(f"expected n_resamples to be an integer >= 1, got {n_resamples!r}")
    if method not in ("BCa", "percentile", "basic"):
        raise ConfigError(f"expected method 'BCa', 'percentile' or 'basic', got {method!r}")
    mean = float(x.mean())
    if np.ptp(x) == 0.0:  # degenerate: scipy would warn and return NaN
        return float(x[0]), float(x[0]), float(x[0])
    rng = rng if rng is not None else np.random.default_rng(0)
    # scipy < 1.15 names the generator random_state
    seed_kw = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"
    batch = max(1, min(n_resamples, 4_000_000 // x.size))  # bounds memory of resamples / jackknife
    for how in dict.fromkeys((method, "percentile")):  # BCa can be NaN on lumpy data
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = stats.bootstrap(
                (x,),
                np.mean,
                n_resamples=n_resamples,
                batch=batch,
                vectorized=True,
                confidence_level=confidence,
                method=how,
                **{seed_kw: rng},
            )
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            return mean, low, high
    return mean, mean, mean


def bootstrap_ci(
    per_prompt_values,
    confidence: float = 0.95,
    n_resamples: int = 9999,
    rng: np.random.Generator | None = None,
    method: str = "BCa",
) -> tuple[float, float, float]:
    """Mean over prompts and its bootstrap confidence interval over prompts -> (mean, low, high).

    scipy.stats.bootstrap (BCa, falling back to percentile when BCa is undefined); all-equal input
    gives (m, m, m); rng defaults to np.random.default_rng(0) so reports are reproducible.
    """
    return _bootstrap_mean(
        _finite_1d("per_prompt_values", per_prompt_values), confidence, n_resamples, rng, method
    )


def paired_bootstrap_ci(
    a,
    b,
    confidence: float = 0.95,
    n_resamples: int = 9999,
    rng: np.random.Generator | None = None,
    method: str = "BCa",
) -> tuple[float, float, float]:
    """Paired bootstrap over prompts of mean(a - b), two methods scored on the same prompts in the
    same order -> (mean_diff, low, high). Resampling prompts jointly is resampling the differences."""
    a, b = _finite_1d("a", a), _finite_1d("b", b)
    if a.shape != b.shape:
        raise ConfigError(f"expected a and b for the same prompts (equal length), got {a.size} and {b.size}")
    return _bootstrap_mean(a - b, confidence, n_resamples, rng, method)
