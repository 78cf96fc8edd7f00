"""`qprobe demo`: the method on held-out problems with the probe shipped in the package, resumable.

The design, fixed before any demo of it was run (issue 20), sized from the committed reproduction
runs (`benchmarks/demo_power.py` -> `benchmarks/results/demo_power.json`):

- problems: the first N problems of HumanEval's test split in the task's order (a fixed rule, never
  a filter on rewards); N is `limit` (`--limit`).
- candidates: n = 8 samples a problem at the settings of the probe's training collection
  (runs/repro/mbpp-train's manifest: temperature 0.8, top_p 0.95, at most 300 new tokens, chat
  form), run seed `seed` (`--seed`). The seeds of the demo's verification are 1, 2 and 3
  (`DEMO_SEEDS`): seed 0 made the committed runs that chose the design.
- the method: the shipped probe `default-code` (a token probe on layer 18 mean-pooled states,
  trained on the 464 MBPP-train problems; nothing is trained at demo time) picks the best of k = 2
  candidates at beta = 0 (argmax, ties split). Only the probe: no consensus term, no visible tests,
  nothing that reads a test-time reward.
- the table: pass@1 (one random sample), the probe's best-of-2, the pass@2 skyline, each with a 95%
  bootstrap interval over problems, and the probe's gain over pass@1 with its paired interval; every
  value is the exact expectation over the n samples (`evaluate.probe_values`: all 2-subsets of the
  8), the rows are `report.method_table`'s, the same as `qprobe eval` and `qprobe report`.
  `qprobe report` on the demo's run shows every k up to 8 in its return-vs-k figure.
- greedy decoding: off by default (`--greedy` adds it). It is one more pass over the N problems one
  sequence at a time, about a quarter of the sampling time (batched decoding of 8 is 2.04x one
  sequence, RESULTS.md), which the power calculation spends on samples instead.

Why k = 2 (decided 2026-12-01 before any of the seeds 1-3 ran): `benchmarks/demo_power.py` on the
committed seed-0 runs gives, per design, the probe's per-problem gain over pass@1 and its spread;
the generation budget is a number of tokens, so the figure of merit is gain / sd / sqrt(tokens a
problem). Of the nine designs it computes (HumanEval or MBPP-test; n x k = 8x4, 8x8, 16x4, 16x8,
4x2, 4x4, 8x2, 8x3, 6x3), HumanEval 8x2 has the highest: gain +0.047, sd 0.084 (8x4: +0.073, sd
0.167), so P(interval above 0) at N = 30 is 0.86 for 8x2 and 0.66 for 8x4. It is the best of nine
on the same data, so 0.86 is optimistic (a winner's curse).

The rule for N: about 14 of the 15 minutes go to sampling (model load included; scoring and the
report take seconds). R = 48.9 tokens/s, measured with the continuous-batching collection on 2
idle cores (`qprobe demo --allow-code-execution --limit 8 --seed 99`: 64 samples, 11,087 tokens in
227 s, `results.json`'s `sampled_now.tokens_per_s`), and the first N HumanEval problems' tokens in
the seed-0 run at n = 8 (39,386 for N = 30: 13.4 minutes at R; 42,025 for 32: 14.3) give N = 30.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.collection.collect import CollectConfig, collect
from qprobe.core.files import write_json_atomic
from qprobe.errors import ConfigError, DataError, SpecMismatchError
from qprobe.evaluation.evaluate import MethodResult, RunData, format_table, paired_difference, probe_scores
from qprobe.features.spec import FeatureRequest, FeatureSpec
from qprobe.generation.base import SamplingConfig
from qprobe.store.run import Run

DEMO_PROBE = "default-code"
DEMO_SEEDS = (1, 2, 3)  # fixed in advance for the three-seed check; `--seed` picks one
DEFAULT_LIMIT = 30  # N: see the rule above (`qprobe demo --help` says it too)


@dataclass(frozen=True)
class DemoConfig:
    task: str = "humaneval"
    split: str = "test"
    task_options: dict[str, Any] = field(default_factory=dict)
    backend: str = "llamacpp"
    model: str | None = None
    backend_options: dict[str, Any] = field(default_factory=dict)
    probe: str = DEMO_PROBE
    limit: int | None = DEFAULT_LIMIT  # N: the first N problems of the split (None or 0: all)
    n: int = 8
    k: int = 2
    beta: float = 0.0
    seed: int = DEMO_SEEDS[0]
    greedy: bool = False
    temperature: float = 0.8  # the probe's training collection's sampling (runs/repro/mbpp-train)
    top_p: float = 0.95
    max_new_tokens: int = 300
    workdir: Path = Path("qprobe-demo")

    def __post_init__(self) -> None:
        if self.limit == 0:
            object.__setattr__(self, "limit", None)  # 0 = every problem
        if self.limit is not None and self.limit < 2:
            raise ConfigError(f"expected --limit >= 2 problems (or 0 for all), got {self.limit}; "
                              "an interval over problems needs at least two")
        if not 1 <= self.k <= self.n:
            raise ConfigError(f"expected 1 <= k <= n, got k={self.k}, n={self.n}; pass -k no larger than --n")
        if not (np.isfinite(self.beta) and self.beta >= 0):
            raise ConfigError(f"expected --beta >= 0 (0 means argmax), got {self.beta}")
        SamplingConfig(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens)

    def collect_config(self, feature: str, greedy: bool = False) -> CollectConfig:
        """The collection of the samples (or, `greedy`, of one greedy completion a problem)."""
        name = f"{self.task}-{self.split}-" + ("greedy" if greedy else f"seed{self.seed}")
        sampling = SamplingConfig(temperature=0.0 if greedy else self.temperature, top_p=self.top_p,
                                  max_new_tokens=self.max_new_tokens, seed=0 if greedy else self.seed)
        return CollectConfig(
            task=self.task, split=self.split, out=Path(self.workdir) / name, n=1 if greedy else self.n,
            backend=self.backend, model=self.model, features=(feature,), sampling=sampling,
            limit=self.limit, task_options=dict(self.task_options),
            backend_options=dict(self.backend_options), shard_samples=32,
        )


def probe_feature(spec: FeatureSpec) -> str:
    """The `--feature` text that collects what a probe scores, e.g. '18:mean'."""
    return f"embed={spec.embedder}:{spec.pooling}" if spec.embedder else f"{spec.layer}:{spec.pooling}"


def first_problems(cfg: DemoConfig) -> list[str]:
    """The ids of the demo's problems: the first N of the split, in the task's order."""
    from qprobe.catalog import TASKS

    task = TASKS.create(cfg.task, **cfg.task_options)
    task.check_split(cfg.split)
    prompts = task.prompts(cfg.split)
    return [p.id for p in (prompts if cfg.limit is None else prompts[: cfg.limit])]


def demo_rows(run: Run, problems: list[str], n: int) -> tuple[RunData, list[str]]:
    """The scored samples 0..n-1 of the listed problems (a run resumed with more keeps them all),
    and the problems left out because none of their samples could be scored (sandbox errors)."""
    data = RunData.load(run)
    index = run.table(["sample_index"]).column("sample_index").to_numpy()[data.rows]
    keep = np.isin(data.prompt_ids, problems) & (index < n)
    data = RunData(run, data.rows[keep], data.prompt_ids[keep], data.rewards[keep], data.unscored)
    have = set(data.prompt_ids.tolist())
    return data, [p for p in problems if p not in have]


def _first_shard_checks(probe: Any, key: str, name: str) -> Callable[[Any], None]:
    """Stop a collection at the first shard that shows the probe cannot be evaluated on it (not at its
    end): features of another model (SpecMismatchError), problems the probe was trained on (DataError)."""
    from qprobe.evaluation.evaluate import run_prompt_hashes

    trained = set((getattr(probe, "source_", {}) or {}).get("train_prompts", {}).get("hashes", []))

    def check(run: Any) -> None:
        try:
            probe.feature_spec_.check_compatible(run.feature_spec(key))
        except SpecMismatchError as exc:
            raise SpecMismatchError(f"{exc} (probe {name}: run the demo with the probe's model, or pass --probe "
                                    "a probe trained on this model's features)") from None
        hashes = run_prompt_hashes(run)  # compared by prompt text, as `evaluate.check_overlap` does
        overlap = sorted(p for p, h in hashes.items() if h in trained)
        if overlap:
            raise DataError(f"expected a probe trained on other problems than the demo's, got probe {name} trained on "
                            f"{len(overlap)} of the {len(hashes)} collected so far (e.g. {overlap[:3]}); "
                            "run the demo on another --split or --task, or pass another --probe")
    return check


def _sampled(path: Path) -> tuple[int, int]:
    """(rows, tokens) stored in a run so far; (0, 0) before it exists."""
    if not (path / "manifest.json").is_file():
        return 0, 0
    run = Run.open(path)
    return len(run), int(np.sum(run.table(["n_tokens"]).column("n_tokens").to_numpy())) if len(run) else 0


@contextmanager
def _status(text: str, spinner: str, enabled: bool, say: Callable[[str], None]) -> Iterator[None]:
    """Print a step's line; with `enabled`, a spinner (on stderr, gone when done) while it runs."""
    say(text)
    if not enabled:
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(spinner):
        yield


def run_demo(cfg: DemoConfig, say: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Collect (or reuse) the samples, score them with the probe, print the table, write the report."""
    from qprobe.evaluation.report import method_table, write_report
    from qprobe.probes.models import Probe

    started = time.perf_counter()
    if cfg.task in ("humaneval", "mbpp") and "prompt_format" not in cfg.task_options:
        # The probe's training collection used the chat form (MODELS.md: MBPP 0.60 vs 0.53 per sample).
        cfg = replace(cfg, task_options={**cfg.task_options, "prompt_format": "chat"})
    probe = Probe.from_pretrained(cfg.probe)
    spec = probe.feature_spec_
    if spec is None:
        raise ConfigError(f"expected a probe that records the features it scores (its feature_spec), got {cfg.probe} "
                          "without one; train it with `qprobe train`, or pass --probe default-code")
    feature = probe_feature(spec)
    key = FeatureRequest.parse(feature).key
    label = f"Q-probe {Path(cfg.probe).name or cfg.probe}"
    problems = first_problems(cfg)
    Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
    steps = 4 if cfg.greedy else 3
    sample_cfg = cfg.collect_config(feature)
    say(f"[1/{steps}] loading the model, then sampling {cfg.n} candidates for each of the first {len(problems)} "
        f"{cfg.task}/{cfg.split} problems (seed {cfg.seed}, feature {key}) into {sample_cfg.out} (resumable)")
    rows0, tokens0 = _sampled(sample_cfg.out)
    t0 = time.perf_counter()
    run = collect(sample_cfg, progress=progress, on_shard=_first_shard_checks(probe, key, cfg.probe))
    sampling_s = time.perf_counter() - t0
    rows1, tokens1 = _sampled(sample_cfg.out)
    data, left_out = demo_rows(run, problems, cfg.n)
    if left_out:
        say(f"      note: {len(left_out)} problems left out, none of their samples could be scored "
            f"(e.g. {left_out[:3]}); re-run the demo to score them again")
    say(f"      {len(data.rows)} scored samples of {len(data.prompts())} problems, "
        + (f"{rows1 - rows0} sampled now in {sampling_s:.0f} s" if rows1 > rows0 else "all reused from the run"))
    greedy = None
    if cfg.greedy:
        greedy_cfg = cfg.collect_config(feature, greedy=True)
        say(f"[2/{steps}] greedy decoding of the {len(problems)} problems into {greedy_cfg.out} (resumable)")
        greedy, _ = demo_rows(collect(greedy_cfg, progress=progress), data.prompts(), 1)
    with _status(f"[{steps - 1}/{steps}] scoring the {len(data.rows)} candidates with {label} ({key}; no training)",
                 "scoring", progress, say):
        scores = probe_scores(data, probe)  # [N]; SpecMismatchError for features of another model
        methods = method_table(data, [label], [scores], cfg.k, cfg.beta, greedy)
    ours = methods[-2]  # the probe's row: method_table puts the skyline last
    gain = paired_difference(ours, methods[0])
    say(f"      {len(data.prompts())} problems, k = {cfg.k}, beta = {cfg.beta:g}; 95% bootstrap intervals over "
        "problems, gains paired against pass@1")
    say(format_table(methods, baseline=methods[0]))
    where = "is above 0" if gain[1] > 0 else ("is below 0" if gain[2] < 0 else "includes 0")
    say(f"{label} best-of-{cfg.k} vs a random sample: {gain[0]:+.3f} [{gain[1]:+.3f}, {gain[2]:+.3f}] "
        f"over {len(data.prompts())} problems; the interval {where}")
    with _status(f"[{steps}/{steps}] writing the report", "writing the report", progress, say):
        page = write_report(data, {label: probe}, Path(cfg.workdir) / "report", cfg.k, cfg.beta,
                            greedy_run=greedy, say=say)
    out = demo_summary(cfg, run, greedy, problems, left_out, key, methods, ours, gain)
    out["report"] = str(page)
    sampled_now = {"samples": rows1 - rows0, "tokens": tokens1 - tokens0, "seconds": sampling_s}
    if rows1 > rows0:
        sampled_now["tokens_per_s"] = (tokens1 - tokens0) / max(sampling_s, 1e-9)
    out["seconds"] = {"sampling": sampling_s, "total": time.perf_counter() - started}
    out["sampled_now"] = sampled_now
    write_json_atomic(Path(cfg.workdir) / "results.json", out)
    minutes, seconds = divmod(round(out["seconds"]["total"]), 60)
    say(f"done in {minutes} min {seconds} s; wrote {Path(cfg.workdir) / 'results.json'}; "
        f"report (open it in a browser): {page}")
    return out


def demo_summary(cfg: DemoConfig, run: Run, greedy: RunData | None, problems: list[str], left_out: list[str],
                 key: str, methods: list[MethodResult], ours: MethodResult,
                 gain: tuple[float, float, float]) -> dict[str, Any]:
    """What results.json holds: the design, the runs, the table and the probe's gain."""
    design = {
        "task": cfg.task, "split": cfg.split, "problems_rule": f"the first {len(problems)} problems of the split, in order",
        "limit": cfg.limit, "problems": problems, "left_out": left_out, "n": cfg.n, "k": cfg.k, "beta": cfg.beta,
        "seed": cfg.seed, "fixed_seeds": list(DEMO_SEEDS), "probe": cfg.probe, "feature": key,
        "sampling": run.manifest.get("sampling"), "model": run.manifest.get("model", {}).get("model"),
        "greedy": cfg.greedy, "training_at_demo_time": False,
    }
    return {
        "design": design,
        "config": {**asdict(cfg), "workdir": str(cfg.workdir)},
        "run": str(run.path), "greedy_run": None if greedy is None else str(greedy.run.path),
        "methods": {m.name: [m.mean, m.low, m.high] for m in methods},
        "gain": {"method": ours.name, "vs": methods[0].name, "mean": gain[0], "low": gain[1], "high": gain[2]},
    }
