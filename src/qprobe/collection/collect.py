"""Collect: sample k completions per prompt, embed and reward them, append to a run.

Generation runs in the calling thread, through the back-end's pool (`generation.base`: on
llama.cpp, continuous batching across prompts, so a prompt's samples may finish after a later
prompt's and rows are stored in the order prompts finish); rewards run in a worker thread (the
sandbox fans out to processes), so scoring overlaps the generation of the next prompts. Rows are committed in
shards; re-running the same command resumes, skipping every (prompt, sample) already stored.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.catalog import BACKENDS, TASKS
from qprobe.core.config import config_from_dict, config_to_dict
from qprobe.core.types import Completion, Prompt, RewardResult
from qprobe.errors import ConfigError, StoreError
from qprobe.features import make_embedder
from qprobe.features.spec import FeatureRequest, FeatureSpec
from qprobe.generation.base import GenRequest, SamplingConfig, generate_many, sample_seed
from qprobe.store.run import Run, RunWriter


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True, kw_only=True)
class CollectConfig:
    """Everything that defines a collection. The same config resumes the same run.

    One schema for Python, the CLI (`qprobe collect` has an option per field, `qprobe.cli.config_options`)
    and files (`to_dict` / `from_dict`; `qprobe collect --config FILE.json`, `--dump-config`, and the
    run manifest's "config")."""

    task: str = field(metadata=_help("Task name (see `qprobe ls`), e.g. mbpp, humaneval, gsm8k, jsonl, fake."))
    split: str = field(default="train", metadata=_help("Split of the task, e.g. train or test."))
    out: Path = field(metadata=_help("Run directory (created, or resumed if it exists)."))
    n: int = field(default=16, metadata=_help("Samples per prompt."))
    backend: str = field(default="llamacpp", metadata=_help("Generation back-end (see `qprobe ls`)."))
    model: str | None = field(default=None, metadata=_help(
        "Model: a GGUF path, a Hugging Face id or path, or a server's model name. Default: the back-end's default."))
    features: tuple[str, ...] = field(default=("-1:last",), metadata={"flag": "--feature", "help": (
        "Features to store, LAYER:POOLING (e.g. -1:last, 18:mean) or embed=NAME:POOLING; repeatable.")})
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    limit: int | None = field(default=None, metadata=_help("Only the first N prompts of the split."))
    prompt_ids: tuple[str, ...] | None = field(default=None, metadata={  # only these prompts (after --limit)
        "flag": "--prompt-id", "help": "Only the prompt with this id (repeatable; after --limit)."})
    task_options: dict[str, Any] = field(default_factory=dict, metadata={
        "flag": "--task-option", "help": "Task option, e.g. data=path/to/mbpp.jsonl or prompt_format=chat."})
    backend_options: dict[str, Any] = field(default_factory=dict, metadata={
        "flag": "--backend-option", "help": "Back-end option, e.g. n_ctx=4096."})
    shots_from: str | None = field(default=None, metadata=_help(
        "A collected run (e.g. the training split): put --shots of its successful completions in front of "
        "every prompt (the paper's few-shot on successes)."))
    shots: int = field(default=5, metadata=_help("How many solved examples --shots-from puts in context."))
    shots_seed: int = field(default=0, metadata=_help("Seed of the random choice of solved examples."))
    feature_dtype: str = field(default="float32", metadata={"choices": ("float32", "float16"),
                                                             "help": "dtype of the stored features."})
    shard_samples: int = field(default=64, metadata=_help("Commit a shard every this many samples."))
    shard_seconds: float = field(default=30.0, metadata=_help(
        "... or once the oldest pending sample is this many seconds old."))

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"expected --n >= 1 samples per prompt, got {self.n}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"expected --limit >= 1 prompts, got {self.limit}")
        if self.feature_dtype not in ("float32", "float16"):
            raise ConfigError(f"expected feature dtype float32 or float16, got '{self.feature_dtype}'")
        for text in self.features:
            FeatureRequest.parse(text)

    @property
    def requests(self) -> list[FeatureRequest]:
        return [FeatureRequest.parse(t) for t in self.features]

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CollectConfig:
        return config_from_dict(cls, data)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("qprobe", "numpy", "pyarrow", "torch", "llama-cpp-python", "transformers", "vllm", "openai"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def fingerprint(manifest: dict[str, Any]) -> dict[str, Any]:
    """The parts of a manifest that must agree for a resume to continue the same run."""
    keys = ("task", "backend", "model", "sampling")
    return {k: manifest.get(k) for k in keys}


@dataclass
class _Pending:
    prompt: Prompt
    prompt_index: int
    text: str
    indices: list[int]
    completions: list[Completion]
    features: dict[str, Any]
    rewards: Future[list[RewardResult]]
    started: float


def collect(cfg: CollectConfig, progress: bool = True, on_shard: Callable[[Run], None] | None = None,
            backend: Any = None) -> Run:
    """Run (or resume) a collection and return the finished run.

    `backend`: one already built from cfg's backend, model and options (a Ray worker keeps its own
    across chunks, `qprobe.collection.distributed`); collect does not close it."""
    task = TASKS.create(cfg.task, **cfg.task_options)
    task.check_split(cfg.split)
    if cfg.shots_from is not None:
        from qprobe.collection.fewshot import shots_from_run
        from qprobe.tasks.fewshot import FewShotTask

        manifest_path = Path(cfg.out) / "manifest.json"
        kept = json.loads(manifest_path.read_text()).get("task", {}).get("shots") if manifest_path.is_file() else None
        task = FewShotTask(task, shots_from_run(cfg.shots_from, cfg.shots, cfg.shots_seed, keep=kept,
                                                avoid=task.prompts(cfg.split), avoid_task=cfg.task))
    indexed = list(enumerate(task.prompts(cfg.split)))  # the index is the prompt's place in the split
    if cfg.limit is not None:
        indexed = indexed[: cfg.limit]
    if cfg.prompt_ids is not None:
        wanted = set(cfg.prompt_ids)
        indexed = [(i, p) for i, p in indexed if p.id in wanted]
    reward = task.reward()
    if reward.executes_code:
        from qprobe import sandbox

        sandbox.require_opt_in()
    backend_opts = dict(cfg.backend_options)
    if cfg.model is not None:
        backend_opts["model"] = cfg.model
    sampling = cfg.sampling
    if not sampling.stop and task.stop:
        sampling = dataclasses.replace(sampling, stop=tuple(task.stop))
    owned = backend is None
    backend = BACKENDS.create(cfg.backend, **backend_opts) if owned else backend
    try:
        ident = backend.identity()
        manifest = {
            "task": {"name": cfg.task, "split": cfg.split, "options": cfg.task_options, **task.manifest()},
            "backend": {"name": cfg.backend, "options": {k: v for k, v in backend_opts.items() if k != "model"}},
            "model": ident,
            "sampling": sampling.to_dict(),
            "reward": reward.manifest(),
            "config": cfg.to_dict(),
        }
        if hasattr(backend, "sampler"):  # everything the sampler applies, the server's own defaults included
            manifest["sampler"] = backend.sampler(sampling)
        if reward.executes_code:
            from qprobe import sandbox

            manifest["reward"]["sandbox"] = sandbox.isolation_level()
        is_new = not (Path(cfg.out) / "manifest.json").exists()
        writer, requests = _open_writer(cfg, manifest)
        try:
            with writer:
                return _collect_into(writer, cfg, requests, indexed, backend, reward, sampling, progress, on_shard)
        except BaseException:
            if is_new and not writer.shards:  # nothing collected: leave nothing half-made behind
                import shutil

                shutil.rmtree(cfg.out, ignore_errors=True)
            raise
    finally:
        if owned:
            backend.close()


def _open_writer(cfg: CollectConfig, manifest: dict[str, Any]) -> tuple[RunWriter, list[FeatureRequest]]:
    """The writer, and the features every new shard gets: the requested ones for a new run; for a
    resumed run, every feature it holds (those `qprobe embed` added too), of which the requested
    ones must be a part."""
    writer = RunWriter.create_or_open(cfg.out, manifest)
    old, new = fingerprint(writer.manifest), fingerprint(json.loads(json.dumps(manifest, default=str)))
    if old != new:
        writer.close()
        diff = [k for k in old if old[k] != new[k]]
        raise StoreError(
            f"expected the settings of the existing run in {cfg.out} to resume it, got different {diff} "
            f"(stored {[old[k] for k in diff]}, asked {[new[k] for k in diff]}); "
            "repeat the original options or write to a new --out"
        )
    stored = writer.manifest.get("features")
    wanted = [r.key for r in cfg.requests]
    requests = cfg.requests
    if stored and not set(wanted) <= set(stored):
        writer.close()
        raise StoreError(
            f"expected features among the run's {sorted(stored)} to resume {cfg.out}, got {sorted(set(wanted) - set(stored))}; "
            "drop --feature to resume with the run's own, or write to a new --out (`qprobe embed` adds features)"
        )
    if stored:
        specs = [writer.feature_spec(k) for k in stored]
        requests = [FeatureRequest(layer=sp.layer, pooling=sp.pooling, embedder=sp.embedder) for sp in specs]
    extra = {"sampler": manifest["sampler"]} if "sampler" in manifest else {}
    writer.update_manifest(versions=library_versions(), n=max(cfg.n, int(writer.manifest.get("n", 0))),
                           complete=False, **extra)
    return writer, requests


def _collect_into(
    writer: RunWriter, cfg: CollectConfig, requests: list[FeatureRequest], prompts: list[tuple[int, Prompt]],
    backend: Any, reward: Any, sampling: SamplingConfig, progress: bool, on_shard: Callable[[Run], None] | None,
) -> Run:
    from qprobe.collection.progress import CollectProgress

    _rescore_unscored(writer, {p.id: p for _, p in prompts}, reward, progress)
    done = writer.pairs()
    todo = [(i, p, [j for j in range(cfg.n) if (p.id, j) not in done]) for i, p in prompts]
    todo = [t for t in todo if t[2]]
    total = len(prompts) * cfg.n
    groups: dict[str, list[FeatureRequest]] = {}
    for req in requests:
        groups.setdefault(req.embedder, []).append(req)
    embedders = {name: make_embedder(backend, name) for name in groups}
    for name, reqs in groups.items():
        embedders[name].prepare(reqs)  # before any sequence runs (llama.cpp keeps their states)
    pending: list[_Pending] = []
    meta: dict[int, tuple[Prompt, list[int]]] = {}

    def asks() -> Iterator[GenRequest]:  # read by the pool as it has room: prompts overlap
        for index, prompt, missing in todo:
            meta[index] = (prompt, missing)
            seeds = tuple(sample_seed(sampling.seed, prompt.id, j) for j in missing)
            yield GenRequest(index, backend.render(prompt), sampling, seeds)

    bar = CollectProgress(total=total, done=total - sum(len(t[2]) for t in todo), enabled=progress)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qprobe-reward") as pool, bar:
            t_last = time.perf_counter()
            for ask, comps in generate_many(backend, asks()):
                index = int(ask.key)  # type: ignore[call-overload]
                prompt, missing = meta.pop(index)
                text = ask.text
                feats: dict[str, Any] = {}
                for name, reqs in groups.items():
                    feats.update(embedders[name].embed(text, comps, reqs))
                if not writer.manifest.get("features"):
                    writer.set_features(_specs(embedders, groups, feats, cfg.feature_dtype))
                fut = pool.submit(reward.score, prompt, [c.text for c in comps])
                now = time.perf_counter()
                pending.append(_Pending(prompt, index, text, missing, comps, feats, fut, now))
                bar.advance(len(comps), sum(c.n_tokens for c in comps), now - t_last)
                t_last = now
                n_pending = sum(len(p.indices) for p in pending)
                if n_pending >= cfg.shard_samples or now - pending[0].started > cfg.shard_seconds:
                    _flush(writer, pending, on_shard)
            _flush(writer, pending, on_shard)
    finally:
        for e in embedders.values():
            e.close()
    complete = len(writer) >= len(prompts) * cfg.n
    from qprobe.store.summary import verdict_counts

    writer.update_manifest(complete=complete, n_prompts=len(prompts), verdicts=verdict_counts(writer))
    return Run.open(writer.path)


def _rescore_unscored(writer: RunWriter, prompts: dict[str, Prompt], reward: Any, progress: bool) -> None:
    """Score again the stored completions whose reward came back null (a sandbox error), without
    regenerating them; rows unscored by design (status "unscored", e.g. the pairs task) stay."""
    import pyarrow.parquet as pq

    todo = 0
    for shard in writer.shards:
        path = writer.path / "rows" / f"{shard.name}.parquet"
        if pq.read_table(path, columns=["reward"]).column("reward").null_count == 0:
            continue  # the usual case: read nothing more
        rows = pq.read_table(path, columns=["prompt_id", "completion", "reward", "details"]).to_pylist()
        by_prompt: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            status = json.loads(row["details"]).get("status") if row["details"] else None
            if row["reward"] is None and status != "unscored" and row["prompt_id"] in prompts:
                by_prompt.setdefault(row["prompt_id"], []).append(i)
        if not by_prompt:
            continue
        updates: dict[int, tuple[float | None, str]] = {}
        for pid, idx in by_prompt.items():
            results = reward.score(prompts[pid], [rows[i]["completion"] for i in idx])
            for i, r in zip(idx, results, strict=True):
                updates[i] = (None if r.reward is None else float(r.reward), json.dumps(r.details, sort_keys=True, default=str))
        writer.replace_rewards(shard, updates)
        todo += len(updates)
    if todo and progress:
        import sys

        print(f"{writer.path}: scored again {todo} stored samples that came back unscored", file=sys.stderr)


def _specs(embedders: dict[str, Any], groups: dict[str, list[FeatureRequest]], feats: dict[str, Any],
           dtype: str) -> dict[str, FeatureSpec]:
    specs = {}
    for name, reqs in groups.items():
        for req in reqs:
            value = feats[req.key]
            dim = int(value[0].shape[-1]) if req.pooling == "tokens" else int(np.asarray(value).shape[-1])
            specs[req.key] = embedders[name].spec(req, dim, dtype)
    return specs


def _flush(writer: RunWriter, pending: list[_Pending], on_shard: Callable[[Run], None] | None) -> None:
    if not pending:
        return
    rows: dict[str, list[Any]] = {c: [] for c in
                                  ("prompt_id", "prompt_index", "sample_index", "prompt", "completion",
                                   "n_tokens", "finish_reason", "reward", "details", "seed")}
    feats: dict[str, list[Any]] = {k: [] for k in pending[0].features}
    for p in pending:
        results = p.rewards.result()
        if len(results) != len(p.completions):
            raise StoreError(f"expected {len(p.completions)} rewards for prompt {p.prompt.id}, got {len(results)}")
        for j, c, r in zip(p.indices, p.completions, results, strict=False):
            rows["prompt_id"].append(p.prompt.id)
            rows["prompt_index"].append(p.prompt_index)
            rows["sample_index"].append(j)
            rows["prompt"].append(p.text)
            rows["completion"].append(c.text)
            rows["n_tokens"].append(c.n_tokens)
            rows["finish_reason"].append(c.finish_reason)
            rows["reward"].append(None if r.reward is None else float(r.reward))
            rows["details"].append(json.dumps(r.details, sort_keys=True, default=str))
            rows["seed"].append(c.seed)
        for k, v in p.features.items():
            feats[k].extend(list(v))
    writer.append(rows, {k: (v if writer.feature_spec(k).pooling == "tokens" else np.stack(v))
                         for k, v in feats.items()})
    pending.clear()
    if on_shard is not None:
        on_shard(writer)
