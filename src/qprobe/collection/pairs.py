"""Preference pairs as a run: each pair is one prompt with two samples, so every run tool works on it.

Row layout: prompt_id = the pair's id, sample_index 0 = the chosen response (reward 1.0) and 1 =
the rejected one (reward 0.0); `prompt` is the back-end's rendering of the pair's prompt (its chat
template where it has one), `completion` the response text, `details` {"role": "chosen" | "rejected",
...the pair's meta}. Features are the back-end's own embedder's (paper section 7: last layer, last
token) or an external embedder's, computed on prompt+response exactly as for sampled completions.
`qprobe train --run RUN --loss bt` then trains on within-prompt pairs, and its validation
metric at k=2 is pairwise accuracy. Writing is resumable: pairs already stored are skipped.

`pairs_from_run(run)` goes the other way: within-prompt (better, worse) row pairs of a collected
run with verifiable rewards (e.g. correct vs incorrect GSM8K samples of one problem).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.catalog import BACKENDS
from qprobe.collection.collect import library_versions
from qprobe.core.types import Completion
from qprobe.errors import ConfigError, DataError, StoreError
from qprobe.features import make_embedder
from qprobe.features.spec import FeatureRequest
from qprobe.store.run import ROW_COLUMNS, Run, RunWriter
from qprobe.tasks.pairs import Pair

CHOSEN, REJECTED = 0, 1  # sample_index of each side


@dataclass(frozen=True)
class PairsConfig:
    """Where the pairs come from (recorded in the manifest) and how they are embedded."""

    out: Path
    source: dict[str, Any] = field(default_factory=dict)  # {"data": ..., "format": ..., "split": ...}
    backend: str = "fake"
    model: str | None = None
    features: tuple[str, ...] = ("-1:last",)
    backend_options: dict[str, Any] = field(default_factory=dict)
    feature_dtype: str = "float32"
    shard_pairs: int = 32

    def __post_init__(self) -> None:
        if self.shard_pairs < 1:
            raise ConfigError(f"expected shard_pairs >= 1, got {self.shard_pairs}")
        if self.feature_dtype not in ("float32", "float16"):
            raise ConfigError(f"expected feature dtype float32 or float16, got '{self.feature_dtype}'")
        for text in self.features:
            if FeatureRequest.parse(text).pooling == "tokens":
                raise ConfigError(f"expected pooling last or mean for pairs, got '{text}'")


def _n_tokens(backend: Any, text: str) -> int:
    tokenize = getattr(backend, "tokenize", None)
    return len(tokenize(text)) if callable(tokenize) else len(text.split())


def embed_pairs(pairs: list[Pair], cfg: PairsConfig, progress: bool = True,
                on_shard: Callable[[Run], None] | None = None) -> Run:
    """Embed prompt+chosen and prompt+rejected of every pair into the run at `cfg.out`."""
    if not pairs:
        raise DataError("expected at least one pair to embed, got none")
    ids = [p.id for p in pairs]
    if len(set(ids)) != len(ids):
        raise DataError("expected unique pair ids, got duplicates; give each row its own 'id'")
    requests = [FeatureRequest.parse(t) for t in cfg.features]
    opts = dict(cfg.backend_options)
    if cfg.model is not None:
        opts["model"] = cfg.model
    backend = BACKENDS.create(cfg.backend, **opts)
    embedders: dict[str, Any] = {}
    try:
        manifest = {
            "kind": "pairs",
            "task": {"name": "pairs", **cfg.source},
            "backend": {"name": cfg.backend, "options": {k: v for k, v in opts.items() if k != "model"}},
            "model": backend.identity(),
            "sampling": None,
            "reward": {"reward": "preference", "chosen": 1.0, "rejected": 0.0},
        }
        path = Path(cfg.out)
        is_new = not (path / "manifest.json").exists()
        with RunWriter.create_or_open(path, manifest) as writer:
            if writer.manifest.get("kind") != "pairs":
                raise StoreError(f"expected a pairs run at {path} to resume, got a run of another kind; choose a new --out")
            stored = writer.manifest.get("features")
            if stored and sorted(stored) != sorted(r.key for r in requests):
                raise StoreError(f"expected the run's features {sorted(stored)} to resume {path}, got "
                                 f"{sorted(r.key for r in requests)}; repeat the original --feature or use a new --out")
            if writer.manifest.get("model", {}).get("sha256") != manifest["model"].get("sha256"):
                raise StoreError(f"expected the model the run at {path} was embedded with, got another; use a new --out")
            writer.update_manifest(versions=library_versions(), complete=False)
            for name in dict.fromkeys(r.embedder for r in requests):
                embedders[name] = make_embedder(backend, name)
            try:
                _embed_into(writer, pairs, requests, embedders, backend, cfg, progress, on_shard)
            except BaseException:
                if is_new and not writer.shards:
                    import shutil

                    shutil.rmtree(path, ignore_errors=True)
                raise
            writer.update_manifest(complete=True, n_prompts=len(pairs))
    finally:
        for e in embedders.values():
            e.close()
        backend.close()
    return Run.open(cfg.out)


def _embed_into(writer: RunWriter, pairs: list[Pair], requests: list[FeatureRequest], embedders: dict[str, Any],
                backend: Any, cfg: PairsConfig, progress: bool, on_shard: Callable[[Run], None] | None) -> None:
    from qprobe.collection.progress import CollectProgress

    done = {pid for pid, _ in writer.pairs()}
    todo = [(i, p) for i, p in enumerate(pairs) if p.id not in done]
    rows: dict[str, list[Any]] = {c: [] for c in ROW_COLUMNS}
    feats: dict[str, list[np.ndarray]] = {r.key: [] for r in requests}
    bar = CollectProgress(total=2 * len(pairs), done=2 * (len(pairs) - len(todo)), enabled=progress)
    with bar:
        for n, (index, pair) in enumerate(todo, 1):
            t0 = time.perf_counter()
            text = backend.render(pair.prompt)
            sep = pair.sep if text == pair.prompt.text else ""  # a chat template takes the bare response
            sides = [sep + pair.chosen, sep + pair.rejected]
            comps = [Completion(s, _n_tokens(backend, s), "stop", j) for j, s in enumerate(sides)]
            out: dict[str, Any] = {}
            for name, emb in embedders.items():
                out.update(emb.embed(text, comps, [r for r in requests if r.embedder == name]))
            if not writer.manifest.get("features"):
                writer.set_features({r.key: embedders[r.embedder].spec(r, int(np.asarray(out[r.key]).shape[-1]),
                                                                       cfg.feature_dtype) for r in requests})
            for j, (c, role) in enumerate(zip(comps, ("chosen", "rejected"), strict=True)):
                details = {"status": role, **pair.meta}
                values = [pair.id, index, j, text, c.text, c.n_tokens, "stop", 1.0 - j,
                          json.dumps(details, sort_keys=True, default=str), j]
                for col, v in zip(ROW_COLUMNS, values, strict=True):
                    rows[col].append(v)
            for r in requests:
                feats[r.key].extend(np.asarray(out[r.key], dtype=np.float32))  # 2 x [d]
            bar.advance(2, sum(c.n_tokens for c in comps), time.perf_counter() - t0)
            if len(rows["prompt_id"]) >= 2 * cfg.shard_pairs or n == len(todo):
                writer.append(rows, {k: np.stack(v) for k, v in feats.items()})
                rows = {c: [] for c in ROW_COLUMNS}
                feats = {r.key: [] for r in requests}
                if on_shard is not None:
                    on_shard(writer)


# ------------------------------------------------------------------------- reading pairs back
@dataclass
class PairRows:
    """The pairs of a run: ids and the row numbers of each chosen and rejected sample."""

    run: Run
    ids: list[str]
    chosen: np.ndarray  # [P] row numbers
    rejected: np.ndarray  # [P] row numbers

    def features(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(chosen [P, d], rejected [P, d])."""
        return self.run.features(key, self.chosen), self.run.features(key, self.rejected)

    def take(self, idx: np.ndarray) -> PairRows:
        idx = np.asarray(idx, dtype=np.int64)
        return PairRows(self.run, [self.ids[i] for i in idx], self.chosen[idx], self.rejected[idx])

    def __len__(self) -> int:
        return len(self.ids)


def read_pairs(run: Run | str | Path) -> PairRows:
    """The (chosen, rejected) rows of a pairs run: per prompt, the reward-1 and the reward-0 sample."""
    run = run if isinstance(run, Run) else Run.open(run)
    t = run.table(["prompt_id", "sample_index", "reward"])
    ids, rewards = t.column("prompt_id").to_pylist(), t.column("reward").to_pylist()
    rows: dict[str, dict[float, int]] = {}
    for i, (pid, r) in enumerate(zip(ids, rewards, strict=True)):
        rows.setdefault(pid, {})[r] = i
    bad = [pid for pid, v in rows.items() if set(v) != {1.0, 0.0}]
    if bad or len(ids) != 2 * len(rows):
        raise StoreError(
            f"expected a pairs run (two samples per prompt, rewards 1 and 0) at {run.path}, got {len(ids)} rows "
            f"for {len(rows)} prompts{f' (e.g. prompt {bad[0]})' if bad else ''}; write it with `qprobe pairs embed`"
        )
    order = list(rows)
    return PairRows(run, order, np.array([rows[p][1.0] for p in order], dtype=np.int64),
                    np.array([rows[p][0.0] for p in order], dtype=np.int64))


def pairs_from_run(run: Run | str | Path, max_per_prompt: int | None = None,
                   rng: np.random.Generator | None = None) -> PairRows:
    """Within-prompt (higher reward, lower reward) row pairs of a collected run, e.g. correct vs
    incorrect samples of one problem; `max_per_prompt` keeps a random subset of each prompt's pairs
    (`rng`, default seed 0). Unscored rows are left out; prompts whose samples all score the same give none."""
    run = run if isinstance(run, Run) else Run.open(run)
    t = run.table(["prompt_id", "reward"])
    by_prompt: dict[str, list[tuple[int, float]]] = {}
    for i, (pid, r) in enumerate(zip(t.column("prompt_id").to_pylist(), t.column("reward").to_pylist(), strict=True)):
        if r is not None and np.isfinite(r):
            by_prompt.setdefault(pid, []).append((i, float(r)))
    rng = rng if rng is not None else np.random.default_rng(0)
    ids: list[str] = []
    chosen: list[int] = []
    rejected: list[int] = []
    for pid, samples in by_prompt.items():
        found = [(a, b) for a, ra in samples for b, rb in samples if ra > rb]
        if max_per_prompt is not None and len(found) > max_per_prompt:
            found = [found[i] for i in sorted(rng.choice(len(found), max_per_prompt, replace=False))]
        for a, b in found:
            ids.append(f"{pid}#{a}>{b}")
            chosen.append(a)
            rejected.append(b)
    if not ids:
        raise DataError(f"expected some prompt of run {run.path} with samples of different rewards, got none")
    return PairRows(run, ids, np.array(chosen, dtype=np.int64), np.array(rejected, dtype=np.int64))
