"""`qprobe demo`: the whole method on one task, end to end, resumable.

Collect n samples per problem, split the problems in two (train / test, by problem), train
probes with L_Q (mse), L_CE (ce) and L_PG (pg), and compare on the test problems, with 95%
bootstrap intervals: a random sample (pass@1), greedy decoding, best-of-k by each probe, and the
pass@k skyline. Everything collected is kept in the work directory and reused on a re-run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.collection.collect import CollectConfig, collect
from qprobe.core.files import write_json_atomic
from qprobe.errors import ConfigError
from qprobe.evaluation.evaluate import (
    MethodResult,
    RunData,
    feature_key_for,
    format_table,
    mean_reward_values,
    method_result,
    pass_at_k_values,
    probe_values,
)
from qprobe.features.spec import FeatureRequest
from qprobe.generation.base import SamplingConfig

DEMO_LOSSES = ("mse", "ce", "pg")


@dataclass(frozen=True)
class DemoConfig:
    task: str = "humaneval"
    split: str = "test"
    task_options: dict[str, Any] = field(default_factory=dict)
    backend: str = "llamacpp"
    model: str | None = None
    backend_options: dict[str, Any] = field(default_factory=dict)
    feature: str = "-1:last"
    n: int = 8
    k: int = 4
    beta: float = 0.0
    train_frac: float = 0.5
    limit: int | None = 50
    seeds: int = 5
    greedy: bool = True
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 256
    workdir: Path = Path("qprobe-demo")
    split_seed: int = 0

    def __post_init__(self) -> None:
        if self.limit == 0:
            object.__setattr__(self, "limit", None)  # 0 = every problem
        if not 1 <= self.k <= self.n:
            raise ConfigError(f"expected 1 <= k <= n, got k={self.k}, n={self.n}; pass -k no larger than --n")
        if not 0 < self.train_frac < 1:
            raise ConfigError(f"expected 0 < --train-frac < 1, got {self.train_frac}")
        if self.seeds < 1:
            raise ConfigError(f"expected --seeds >= 1, got {self.seeds}")
        FeatureRequest.parse(self.feature)

    def collect_config(self, greedy: bool = False, prompt_ids: tuple[str, ...] | None = None) -> CollectConfig:
        name = f"{self.task}-{self.split}-" + ("greedy" if greedy else f"t{self.temperature}")
        sampling = SamplingConfig(temperature=0.0 if greedy else self.temperature, top_p=self.top_p,
                                  max_new_tokens=self.max_new_tokens)
        return CollectConfig(
            task=self.task, split=self.split, out=Path(self.workdir) / name, n=1 if greedy else self.n,
            backend=self.backend, model=self.model, features=(self.feature,), sampling=sampling,
            limit=self.limit, prompt_ids=prompt_ids, task_options=dict(self.task_options),
            backend_options=dict(self.backend_options), shard_samples=32,
        )


def split_by_problem(prompt_ids: list[str], train_frac: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded split of problems (never of samples) into train and test."""
    ids = sorted(set(prompt_ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    n_train = max(1, min(len(ids) - 1, int(round(train_frac * len(ids)))))
    train = sorted(ids[i] for i in order[:n_train])
    test = sorted(ids[i] for i in order[n_train:])
    return train, test


def train_and_score(data: RunData, key: str, train_ids: list[str], loss: str, seeds: int, k: int,
                    beta: float) -> tuple[np.ndarray, list[Any]]:
    """Probes of one loss for each seed, trained on train problems; scores of every row averaged
    over seeds is NOT what we report: each seed's per-prompt return is averaged instead."""
    from qprobe.probes.models import LinearProbe
    from qprobe.probes.train import TrainConfig

    x = data.features(key)  # [N, d]
    is_train = np.isin(data.prompt_ids, train_ids)
    spec = data.run.feature_spec(key)
    probes, all_scores = [], []
    for s in range(seeds):
        probe = LinearProbe(loss=loss, train=TrainConfig(k=k, beta=beta), seed=s)
        probe.fit(x[is_train], data.rewards[is_train], data.prompt_ids[is_train], spec=spec,
                  source={"run": str(data.run.path), "feature": key})
        probes.append(probe)
        all_scores.append(probe.score(x))
    return np.stack(all_scores), probes  # [seeds, N]


def seed_averaged_values(data: RunData, scores: np.ndarray, test_ids: list[str], k: int,
                         beta: float) -> dict[str, float]:
    """Per test prompt: expected return at k, averaged over the probe seeds."""
    test = np.isin(data.prompt_ids, test_ids)
    sub = RunData(data.run, data.rows[test], data.prompt_ids[test], data.rewards[test])
    per_seed = [probe_values(sub, s[test], k, beta) for s in scores]
    return {p: float(np.mean([v[p] for v in per_seed])) for p in per_seed[0]}


def run_demo(cfg: DemoConfig, say: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    if cfg.task in ("humaneval", "mbpp") and "prompt_format" not in cfg.task_options:
        # An instruct model does better answering in chat form (MODELS.md: MBPP 0.60 vs 0.53 per sample).
        cfg = replace(cfg, task_options={**cfg.task_options, "prompt_format": "chat"})
    Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
    say(f"[1/5] collecting {cfg.n} samples per problem of {cfg.task}/{cfg.split} with {cfg.backend} "
        f"into {cfg.workdir} (resumable)")
    run = collect(cfg.collect_config(), progress=progress)
    data = RunData.load(run)
    train_ids, test_ids = split_by_problem(data.prompts(), cfg.train_frac, cfg.split_seed)
    say(f"      {len(run)} samples; {len(train_ids)} train problems, {len(test_ids)} test problems")
    results: dict[str, MethodResult] = {}
    sub_test = np.isin(data.prompt_ids, test_ids)
    test_data = RunData(run, data.rows[sub_test], data.prompt_ids[sub_test], data.rewards[sub_test])
    results["pass@1"] = method_result("pass@1", mean_reward_values(test_data), test_ids)
    if cfg.greedy:
        say(f"[2/5] greedy decoding of the {len(test_ids)} test problems")
        greedy = RunData.load(collect(cfg.collect_config(greedy=True, prompt_ids=tuple(test_ids)), progress=progress))
        results["greedy"] = method_result("greedy", mean_reward_values(greedy), test_ids)
    else:
        say("[2/5] greedy decoding skipped (--no-greedy)")
    key = feature_key_for(run, run.feature_spec(run.feature_keys[0]))
    say(f"[3/5] training linear probes ({', '.join(DEMO_LOSSES)}) x {cfg.seeds} seeds on {key}")
    curves: dict[str, list[float]] = {}
    scores_by_loss, first_probe = {}, {}
    for loss in DEMO_LOSSES:
        scores, probes = train_and_score(data, key, train_ids, loss, cfg.seeds, cfg.k, cfg.beta)
        scores_by_loss[loss], first_probe[loss] = scores, probes[0]
        results[loss] = method_result(f"Q-probe {loss} (k={cfg.k})", seed_averaged_values(data, scores, test_ids, cfg.k, cfg.beta), test_ids)
    results["pass@k"] = method_result(f"pass@{cfg.k}", pass_at_k_values(test_data, cfg.k), test_ids)
    say("[4/5] return against k")
    ks = list(range(1, cfg.n + 1))
    for loss, scores in scores_by_loss.items():
        curves[loss] = [float(np.mean(list(seed_averaged_values(data, scores, test_ids, k, cfg.beta).values()))) for k in ks]
    curves["pass@k"] = [float(np.mean(list(pass_at_k_values(test_data, k).values()))) for k in ks]
    curves["pass@1"] = [results["pass@1"].mean] * len(ks)
    png = Path(cfg.workdir) / "return_vs_k.png"
    plotted = plot_curves(ks, curves, png, title=f"{cfg.task}: Q-probe return against k ({len(test_ids)} test problems)")
    say("[5/5] results on the test problems (95% bootstrap CI over problems; gain paired against pass@1)")
    table = format_table(list(results.values()), baseline=results["pass@1"])
    say(table)
    out = {
        "config": {**asdict(cfg), "workdir": str(cfg.workdir)},
        "run": str(run.path), "feature": key, "train_problems": train_ids, "test_problems": test_ids,
        "methods": {name: [r.mean, r.low, r.high] for name, r in results.items()},
        "return_vs_k": {"k": ks, **curves},
        "figure": str(png) if plotted else None,
    }
    write_json_atomic(Path(cfg.workdir) / "results.json", out)
    say(f"wrote {Path(cfg.workdir) / 'results.json'}" + (f" and {png}" if plotted else " (no matplotlib: no figure)"))
    from qprobe.evaluation.report import write_report

    page = write_report(data, first_probe, Path(cfg.workdir) / "report", cfg.k, cfg.beta,
                        greedy_run=greedy.run if cfg.greedy else None, prompt_ids=test_ids)
    out["report"] = str(page)
    say(f"report (seed-0 probes, test problems; open it in a browser): {page}")
    return out


def plot_curves(ks: list[int], curves: dict[str, list[float]], path: Path, title: str) -> bool:
    """Return against k, one line per method; False when matplotlib is missing."""
    from qprobe.evaluation.plots import new_axes, save

    axes = new_axes()
    if axes is None:
        return False
    fig, ax = axes
    for name, ys in curves.items():
        ax.plot(ks, ys, marker="o", ms=3, label=name, linestyle="--" if name in ("pass@k", "pass@1") else "-")
    ax.set_xlabel("k (candidates)")
    ax.set_ylabel("expected reward")
    save(fig, ax, title, path)
    return True
