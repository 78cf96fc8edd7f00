"""Preference pairs in a run on disk: the row layout, and the (chosen, rejected) rows read back.

Row layout of a pairs run (`qprobe pairs embed`): prompt_id = the pair's id, sample_index 0 = the
chosen response (reward 1.0) and 1 = the rejected one (reward 0.0); `prompt` is the back-end's
rendering of the pair's prompt (its chat template where it has one), `completion` the response text,
`details` {"status": "chosen" | "rejected", ...the pair's meta}.

`pairs_from_run(run)` goes the other way: within-prompt (better, worse) row pairs of a collected
run with verifiable rewards (e.g. correct vs incorrect GSM8K samples of one problem), built by
`ordered_pairs` (rewards and prompt ids -> row pairs), which `qprobe train --pairs-from` and the
pairwise losses' all-pairs batches (`qprobe.probes.data.within_prompt_pairs`) share.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qprobe.errors import ConfigError, DataError, StoreError
from qprobe.store.run import Run

CHOSEN, REJECTED = 0, 1  # sample_index of each side


@dataclass
class PairRows:
    """The pairs of a run: ids and the row numbers of each chosen and rejected sample."""

    run: Run
    ids: list[str]
    chosen: np.ndarray  # [P] row numbers
    rejected: np.ndarray  # [P] row numbers
    prompts: list[str] | None = None  # [P] each pair's prompt id (None: the pair's own id, a pairs run)

    def prompt_ids(self) -> list[str]:
        """Each pair's prompt id: pairs of one prompt share it (split by these, never by pair)."""
        return list(self.ids) if self.prompts is None else list(self.prompts)

    def features(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(chosen [P, d], rejected [P, d])."""
        return self.run.features(key, self.chosen), self.run.features(key, self.rejected)

    def take(self, idx: np.ndarray) -> PairRows:
        idx = np.asarray(idx, dtype=np.int64)
        return PairRows(self.run, [self.ids[i] for i in idx], self.chosen[idx], self.rejected[idx],
                        None if self.prompts is None else [self.prompts[i] for i in idx])

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


def _prompt_seed(seed: int, prompt: str) -> list[int]:
    """The entropy of one prompt's pair sample: the stated seed and a stable hash of the prompt id."""
    import hashlib

    return [int(seed), int.from_bytes(hashlib.sha256(str(prompt).encode("utf-8")).digest()[:8], "little")]


def ordered_pairs(rewards: np.ndarray, groups: np.ndarray, max_per_group: int | None = None,
                  seed: int = 0) -> np.ndarray:
    """Row pairs [P, 2] (chosen, rejected) within each group (prompt): every pair of its rows with
    reward[chosen] > reward[rejected] (0/1 rewards: passing vs failing; real rewards: any strictly
    ordered pair). Rows with a non-finite reward (unscored) are skipped; groups whose rows all score
    the same give none. Pairs come in sorted group order, then by row.

    `max_per_group` keeps at most that many of a group's pairs, drawn uniformly without replacement
    by a generator seeded with (`seed`, a hash of the group's label): a prompt's sample depends on
    the seed and its own rows only, never on which other prompts are in the set (a split or fold
    draws the same pairs for it as the whole run)."""
    if max_per_group is not None and (isinstance(max_per_group, bool) or not isinstance(max_per_group, int)
                                      or max_per_group < 1):
        raise ConfigError(f"expected pairs per prompt to be an integer >= 1 (or None for all), got {max_per_group!r}")
    r = np.asarray(rewards, dtype=np.float64)
    g = np.asarray(groups)
    if r.ndim != 1 or g.shape != r.shape:
        raise ConfigError(f"expected rewards [N] and groups [N] of the same length, got {r.shape} and {g.shape}")
    labels, codes = np.unique(g, return_inverse=True)
    order = np.argsort(codes, kind="stable")  # rows grouped, in row order within a group
    bounds = np.cumsum(np.bincount(codes, minlength=labels.size))[:-1]
    out = [np.zeros((0, 2), dtype=np.int64)]
    for label, rows in zip(labels, np.split(order, bounds) if labels.size else [], strict=True):
        rows = rows[np.isfinite(r[rows])]
        a, b = np.nonzero(r[rows][:, None] > r[rows][None, :])  # [n, n] strictly ordered
        found = np.stack([rows[a], rows[b]], axis=1).astype(np.int64)  # [p, 2]
        if max_per_group is not None and len(found) > max_per_group:
            rng = np.random.default_rng(_prompt_seed(seed, label))
            found = found[np.sort(rng.choice(len(found), max_per_group, replace=False))]
        out.append(found)
    return np.concatenate(out)


def pairs_from_run(run: Run | str | Path, max_per_prompt: int | None = None, *, seed: int = 0,
                   prompts: Collection[str] | None = None) -> PairRows:
    """Within-prompt (higher reward, lower reward) row pairs of a collected run, e.g. passing vs
    failing samples of one problem (`ordered_pairs`: all of them, or at most `max_per_prompt` a
    prompt drawn with `seed`). `prompts`: only these prompt ids (a split: pairs never cross it).
    Unscored rows are left out; prompts whose samples all score the same give none. Pairs never
    cross prompts."""
    run = run if isinstance(run, Run) else Run.open(run)
    t = run.table(["prompt_id", "reward"])
    pids = np.asarray(t.column("prompt_id").to_pylist(), dtype=object).astype(str)
    rewards = np.asarray([np.nan if r is None else r for r in t.column("reward").to_pylist()], dtype=np.float64)
    rows = np.arange(len(pids))
    if prompts is not None:
        rows = rows[np.isin(pids, np.asarray(sorted(set(prompts)), dtype=str))]
    local = ordered_pairs(rewards[rows], pids[rows], max_per_prompt, seed)
    chosen, rejected = rows[local[:, 0]], rows[local[:, 1]]
    if not len(chosen):
        where = f" among the {len(set(pids[rows]))} prompts asked for" if prompts is not None else ""
        raise DataError(f"expected some prompt of run {run.path}{where} with samples of different rewards, got none; "
                        "a prompt whose samples all pass or all fail gives no pairs (sample more per prompt)")
    ids = [f"{pids[a]}#{a}>{b}" for a, b in zip(chosen, rejected, strict=True)]
    return PairRows(run, ids, chosen.astype(np.int64), rejected.astype(np.int64), [str(pids[a]) for a in chosen])
