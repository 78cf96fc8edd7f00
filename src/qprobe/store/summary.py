"""A summary of a run for `qprobe inspect`: counts, reward rate, feature shapes, provenance."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.store.run import Run


def verdict_counts(run: Run) -> dict[str, Any]:
    """Scored and unscored rows, and the timeouts among the scored (details status "timeout"):
    what collect records in the manifest and `qprobe inspect` shows."""
    t = run.table(["reward", "details"])
    rewards = t.column("reward").to_pylist()
    statuses = [json.loads(d).get("status") if d else None for d in t.column("details").to_pylist()]
    scored = sum(r is not None for r in rewards)
    timeouts = sum(1 for r, s in zip(rewards, statuses, strict=True) if r is not None and s == "timeout")
    return {"scored": scored, "unscored": len(rewards) - scored, "timeouts": timeouts,
            "timeout_rate": round(timeouts / scored, 6) if scored else None}


def run_summary(path: str | Path) -> dict[str, Any]:
    run = Run.open(path)
    m = run.manifest
    t = run.table(["prompt_id", "reward", "n_tokens", "finish_reason", "details"])
    rewards = np.array([np.nan if r is None else r for r in t.column("reward").to_pylist()], dtype=float)
    prompts = t.column("prompt_id").to_pylist()
    per_prompt = Counter(prompts)
    statuses = Counter(json.loads(d).get("status", "?") for d in t.column("details").to_pylist() if d)
    scored = rewards[~np.isnan(rewards)]
    by_prompt: dict[str, list[float]] = {}
    for p, r in zip(prompts, rewards, strict=False):
        if not np.isnan(r):
            by_prompt.setdefault(p, []).append(r)
    mixed = sum(1 for v in by_prompt.values() if min(v) != max(v))
    features = {}
    for key in run.feature_keys:
        spec = run.feature_spec(key)
        size = sum(f.stat().st_size for f in (run.path / "features" / key).glob("*.npy"))
        if spec.pooling == "tokens":
            n = sum(int(np.load(run.path / "features" / key / f"{s.name}.offsets.npy")[-1]) for s in run.shards)
            shape = f"[{n} tokens, {spec.dim}]"
        else:
            shape = f"[{len(run)}, {spec.dim}]"
        features[key] = f"{shape} {spec.dtype}, {_size(size)} on disk ({spec.describe()})"
    task = m.get("task", {})
    model = m.get("model", {})
    return {
        "run": str(run.path),
        "task": f"{task.get('name')} / {task.get('split')}",
        "backend": m.get("backend", {}).get("name"),
        "model": f"{model.get('model')} (sha256 {str(model.get('sha256', ''))[:16]})",
        "samples": len(run),
        "prompts": len(per_prompt),
        "samples per prompt": f"{min(per_prompt.values(), default=0)}-{max(per_prompt.values(), default=0)} (target {m.get('n')})",
        "complete": m.get("complete"),
        "reward rate": f"{scored.mean():.4f} over {len(scored)} scored" if len(scored) else "n/a",
        "unscored": int(np.isnan(rewards).sum()),
        "timeout rate": _timeout_line(verdict_counts(run), m.get("verdicts")),
        "prompts with mixed rewards": mixed,
        "mean tokens": round(float(np.mean(t.column("n_tokens").to_numpy())), 1) if len(run) else 0,
        "finish reasons": dict(Counter(t.column("finish_reason").to_pylist())),
        "statuses": dict(statuses),
        "sampling": m.get("sampling"),
        "sampler": m.get("sampler", "not recorded (collected before qprobe recorded it)"),
        "features": features,
        "shards": len(run.shards),
        "provenance": {"created": m.get("created"), "updated": m.get("updated"), **m.get("versions", {})},
    }


def _timeout_line(now: dict[str, Any], recorded: dict[str, Any] | None) -> str:
    if not now["scored"]:
        return "n/a"
    line = f"{now['timeout_rate']:.4f} ({now['timeouts']} of {now['scored']} scored samples hit the time limit)"
    if recorded is not None and recorded != now:
        line += f"; the manifest recorded {recorded.get('timeouts')} of {recorded.get('scored')}"
    return line


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
