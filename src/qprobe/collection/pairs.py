"""Preference pairs stored as a run (`qprobe pairs embed`): each pair is one prompt with two samples,
so every run tool works on it; the row layout is `qprobe.store.pairs`'s.

Features are the back-end's own embedder's (paper section 7: last layer, last token) or an external
embedder's, computed on prompt+response exactly as for sampled completions. `qprobe train --run RUN
--loss bt` then trains on within-prompt pairs, and its validation metric at k=2 is pairwise accuracy.
Writing is resumable: pairs already stored are skipped.
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
from qprobe.store.pairs import CHOSEN, REJECTED
from qprobe.store.run import ROW_COLUMNS, Run, RunWriter
from qprobe.tasks.pairs import Pair


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
            sides = [sep + pair.chosen, sep + pair.rejected]  # sample_index CHOSEN, REJECTED
            comps = [Completion(s, _n_tokens(backend, s), "stop", j) for j, s in enumerate(sides)]
            out: dict[str, Any] = {}
            for name, emb in embedders.items():
                out.update(emb.embed(text, comps, [r for r in requests if r.embedder == name]))
            if not writer.manifest.get("features"):
                writer.set_features({r.key: embedders[r.embedder].spec(r, int(np.asarray(out[r.key]).shape[-1]),
                                                                       cfg.feature_dtype) for r in requests})
            for j, role in ((CHOSEN, "chosen"), (REJECTED, "rejected")):
                c = comps[j]
                details = {"status": role, **pair.meta}
                values = [pair.id, index, j, text, c.text, c.n_tokens, "stop", 1.0 if j == CHOSEN else 0.0,
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
