"""Preference pairs in a run on disk: the row layout, and the (chosen, rejected) rows read back.

Row layout of a pairs run (`qprobe pairs embed`): prompt_id = the pair's id, sample_index 0 = the
chosen response (reward 1.0) and 1 = the rejected one (reward 0.0); `prompt` is the back-end's
rendering of the pair's prompt (its chat template where it has one), `completion` the response text,
`details` {"status": "chosen" | "rejected", ...the pair's meta}.

`pairs_from_run(run)` goes the other way: within-prompt (better, worse) row pairs of a collected
run with verifiable rewards (e.g. correct vs incorrect GSM8K samples of one problem).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qprobe.errors import DataError, StoreError
from qprobe.store.run import Run

CHOSEN, REJECTED = 0, 1  # sample_index of each side


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
