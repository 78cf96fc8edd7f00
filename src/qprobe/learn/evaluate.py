"""pass@1 of the current policy on a fixed held-out set: greedy and sampled, intervals over problems.

Greedy: one completion at temperature 0. Sampled: `samples` completions at temperature 1 (top_p 1,
the training distribution), seeds fixed per (problem, index) so every evaluation of a run draws with
the same seeds. Each problem's value is its mean verdict; the mean over problems gets a 95% bootstrap
interval over problems (`qprobe.evaluation.evaluate.method_result`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from qprobe.core.types import Prompt
from qprobe.evaluation.evaluate import method_result
from qprobe.generation.base import SamplingConfig, sample_seed
from qprobe.learn.policy import Policy
from qprobe.learn.rewards import oracle_rewards


def evaluate_policy(policy: Policy, prompts: list[Prompt], task_reward: Any, sampling: SamplingConfig,
                    samples: int, seed: int, version: int) -> dict[str, Any]:
    """{"greedy": {mean, low, high, n_prompts, per_prompt}, "sampled": {...}, "tokens", "seconds"}.

    `per_prompt` (problem id -> its pass@1) lets two runs or two steps be compared paired on the same
    problems (`MethodResult.from_json`, `paired_difference`); see the module docstring."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    tokens = 0
    plans = [("greedy", dataclasses.replace(sampling, temperature=0.0), 1),
             ("sampled", dataclasses.replace(sampling, temperature=1.0, top_p=1.0), samples)]
    for name, samp, n in plans:
        asked = [p for p in prompts for _ in range(n)]
        seeds = [sample_seed(seed, p.id, j) for p in prompts for j in range(n)]
        rollouts = policy.sample(asked, samp, seeds, version=version)
        verdicts = oracle_rewards(task_reward, rollouts)
        tokens += sum(r.completion.n_tokens for r in rollouts)
        per: dict[str, list[float]] = {}
        for r, v in zip(rollouts, verdicts, strict=True):
            per.setdefault(r.prompt.id, []).append(0.0 if v is None else float(v))
        res = method_result(f"{name} pass@1", {p: float(np.mean(v)) for p, v in per.items()},
                            rng=np.random.default_rng(0))
        out[name] = {**res.to_json(), "samples_per_prompt": n}
    out["tokens"] = tokens
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out
