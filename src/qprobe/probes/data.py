"""Training examples and the index batches fed to losses (numpy only).

Every training set is one shape: features [N, d], rewards [N] and a prompt id per row. Preference
pairs become two rows (reward 1 for the chosen, 0 for the rejected) sharing a group id, so any loss
trains on them, and the validation metric (expected return at k=2) is then pairwise accuracy with
ties counted one half.

A batch holds row indices only: `index` [B] (pointwise), [G, k] with `mask` (grouped) or [P, 2]
(pairwise: chosen, rejected).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from qprobe.errors import ConfigError, DataError


@dataclass(frozen=True)
class Examples:
    features: np.ndarray  # [N, d] float32
    rewards: np.ndarray  # [N] float64
    groups: np.ndarray  # [N] int64 codes 0..P-1, one per prompt
    pairs: np.ndarray | None = None  # [P, 2] (chosen, rejected) rows for pairwise losses; None = all within-prompt pairs

    @property
    def n_prompts(self) -> int:
        return int(self.groups.max()) + 1 if self.groups.size else 0

    def take(self, rows: np.ndarray) -> Examples:
        """A subset of rows, group codes renumbered 0..P'-1; explicit pairs keep those with both rows
        in the subset (a split by prompt keeps every pair of its prompts), renumbered."""
        rows = np.asarray(rows, dtype=np.int64)
        _, codes = np.unique(self.groups[rows], return_inverse=True)
        pairs = None
        if self.pairs is not None:
            new = np.full(self.groups.size, -1, dtype=np.int64)
            new[rows] = np.arange(rows.size)
            mapped = new[self.pairs]  # [P, 2]
            pairs = mapped[(mapped >= 0).all(axis=1)]
        return Examples(self.features[rows], self.rewards[rows], codes.astype(np.int64), pairs)


@dataclass(frozen=True)
class Batch:
    index: np.ndarray  # [B] | [G, k] | [P, 2] row indices
    mask: np.ndarray | None = None  # [G, k] for grouped batches


def _check_pair_rows(pair_rows, codes: np.ndarray) -> np.ndarray:
    """[P, 2] row numbers, both rows of a pair of one prompt."""
    idx = np.asarray(pair_rows)
    if idx.ndim != 2 or idx.shape[1] != 2 or idx.shape[0] == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise ConfigError(f"expected pair_rows as integer row numbers [P, 2] (chosen, rejected) with P >= 1, got "
                          f"shape {idx.shape} of {idx.dtype}")
    if idx.min() < 0 or idx.max() >= codes.size:
        raise ConfigError(f"expected pair_rows in [0, {codes.size}) (rows of the features), got {idx.min()}..{idx.max()}")
    if not (codes[idx[:, 0]] == codes[idx[:, 1]]).all():
        raise DataError("expected pairs of one prompt (same group), got a pair across prompts; pair samples within a prompt")
    return idx.astype(np.int64)


def make_examples(features, rewards=None, groups=None, pairs=None, pair_rows=None) -> Examples:
    """Validate and normalise the inputs of `Probe.fit` into `Examples`."""
    if pairs is not None:
        if pair_rows is not None:
            raise ConfigError("expected either pairs=(chosen, rejected) features or pair_rows (row numbers), got both")
        if features is not None or rewards is not None:
            raise ConfigError("expected either features/rewards/groups or pairs=(chosen, rejected), got both")
        try:
            chosen, rejected = (np.asarray(p, dtype=np.float32) for p in pairs)
        except (TypeError, ValueError):
            raise ConfigError("expected pairs=(chosen_features [P, d], rejected_features [P, d])") from None
        if chosen.ndim != 2 or chosen.shape != rejected.shape or chosen.shape[0] == 0:
            raise ConfigError(
                f"expected chosen and rejected features of the same shape [P, d], got {chosen.shape} "
                f"and {rejected.shape}"
            )
        p = chosen.shape[0]
        feats = np.concatenate([chosen, rejected])  # [2P, d]
        r = np.concatenate([np.ones(p), np.zeros(p)])  # [2P]
        g = np.concatenate([np.arange(p), np.arange(p)])  # [2P]
        return Examples(feats, r, g.astype(np.int64))
    if features is None or rewards is None:
        raise ConfigError("expected features [N, d] and rewards [N] (or pairs=...), got None")
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ConfigError(f"expected features as a 2-D array [N, d] with N >= 1, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    r = np.asarray(rewards, dtype=np.float64)
    if r.shape != (x.shape[0],):
        raise ConfigError(f"expected rewards of shape ({x.shape[0]},), got {r.shape}")
    if not np.isfinite(r).all():
        raise DataError("expected finite rewards, got NaN or inf; drop unscored samples (reward null) first")
    if not np.isfinite(x).all():
        raise DataError("expected finite features, got NaN or inf; the feature array is corrupt")
    if groups is None:
        codes = np.zeros(x.shape[0], dtype=np.int64)  # one prompt
    else:
        g = np.asarray(groups)
        if g.shape != (x.shape[0],):
            raise ConfigError(f"expected groups (a prompt id per row) of shape ({x.shape[0]},), got {g.shape}")
        _, codes = np.unique(g, return_inverse=True)
    codes = codes.astype(np.int64)
    return Examples(x, r, codes, None if pair_rows is None else _check_pair_rows(pair_rows, codes))


def split_prompts(groups: np.ndarray, frac: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows of (kept, held-out) prompts: round(frac * prompts) prompts are held out, at least one and
    never all when frac > 0. No prompt has rows on both sides."""
    if not 0.0 <= frac < 1.0:
        raise ConfigError(f"expected a held-out fraction in [0, 1), got {frac!r}")
    codes = np.unique(groups)
    n_hold = min(max(int(round(frac * codes.size)), 1 if frac > 0 else 0), codes.size - 1)
    if frac > 0 and n_hold < 1:
        raise ConfigError(f"expected at least 2 prompts to hold some out, got {codes.size}; pass --holdout 0")
    held = rng.permutation(codes)[:n_hold]
    is_held = np.isin(groups, held)
    return np.nonzero(~is_held)[0], np.nonzero(is_held)[0]


def fold_prompts(groups: np.ndarray, folds: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """K-fold over prompts: for each fold, rows of (kept, held-out) prompts. The prompts are shuffled
    and dealt into `folds` parts of near-equal size; every prompt is held out exactly once."""
    codes = np.unique(groups)
    if not 2 <= folds <= codes.size:
        raise ConfigError(f"expected 2 <= folds <= prompts ({codes.size}), got {folds}")
    part = np.empty(codes.size, dtype=np.int64)
    part[rng.permutation(codes.size)] = np.arange(codes.size) % folds  # [P] fold of each prompt
    fold_of_row = part[np.searchsorted(codes, groups)]  # [N]
    return [(np.nonzero(fold_of_row != f)[0], np.nonzero(fold_of_row == f)[0]) for f in range(folds)]


def _sorted_by_group(groups: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ordered by (group, key); their position within the group; each group's row count."""
    order = np.lexsort((key, groups))  # [N]
    counts = np.bincount(groups)  # [P]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])  # [P]
    pos = np.arange(order.size) - starts[groups[order]]  # [N]
    return order, pos, counts


def _pack(order: np.ndarray, chunk_id: np.ndarray, slot: np.ndarray, width: int) -> Batch:
    """Rows order[i] go to row chunk_id[i], column slot[i] of a padded [G, width] index."""
    g = int(chunk_id.max()) + 1
    index = np.zeros((g, width), dtype=np.int64)
    mask = np.zeros((g, width), dtype=bool)
    index[chunk_id, slot] = order
    mask[chunk_id, slot] = True
    return Batch(index, mask)


def _mask(groups: Batch) -> np.ndarray:
    """The mask of a grouped batch (`_pack` always sets one)."""
    if groups.mask is None:
        raise TypeError("expected a grouped batch with a mask, got a batch without one")
    return groups.mask


def full_groups(ex: Examples) -> Batch:
    """Every prompt's samples as one group, in row order: [P, max n] with a mask."""
    order, pos, counts = _sorted_by_group(ex.groups, np.arange(ex.groups.size))
    return _pack(order, ex.groups[order], pos, int(counts.max()))


def random_groups(ex: Examples, size: int, rng: np.random.Generator) -> Batch:
    """The paper's regrouping: each prompt's samples shuffled and cut into groups of `size`;
    leftovers dropped; a prompt with fewer than `size` samples makes one smaller group. Groups in
    random order."""
    order, pos, counts = _sorted_by_group(ex.groups, rng.random(ex.groups.size))
    g = ex.groups[order]
    full = np.maximum(counts // size, 1)  # [P] groups per prompt
    keep = pos // size < full[g]
    first = np.concatenate([[0], np.cumsum(full)[:-1]])  # [P] first chunk id of each prompt
    chunk = first[g] + pos // size
    batch = _pack(order[keep], chunk[keep], (pos % size)[keep], size)
    perm = rng.permutation(batch.index.shape[0])
    return Batch(batch.index[perm], _mask(batch)[perm])


def within_prompt_pairs(ex: Examples) -> Batch:
    """The pairs a pairwise loss trains on: `ex.pairs` when given, else all (chosen, rejected) row
    pairs of one prompt with a higher reward for the chosen (`qprobe.store.pairs.ordered_pairs`): [P, 2]."""
    from qprobe.store.pairs import ordered_pairs

    index = ex.pairs if ex.pairs is not None else ordered_pairs(ex.rewards, ex.groups)
    if index.shape[0] == 0:
        raise DataError(
            "expected some prompt with samples of different rewards to form pairs, got none; "
            "a pairwise loss needs them (use mse/ce, or more samples per prompt)"
        )
    return Batch(index)  # [P, 2]


def full_batch(kind: str, ex: Examples) -> Batch:
    """The whole training set as one batch of the loss's kind."""
    if kind == "pointwise":
        return Batch(np.arange(ex.groups.size))
    if kind == "grouped":
        return full_groups(ex)
    return within_prompt_pairs(ex)


def epoch_batches(kind: str, ex: Examples, rng: np.random.Generator, *, batch_size: int,
                  group_size: int, groups_per_batch: int, pairs: Batch | None = None) -> Iterator[Batch]:
    """One epoch of minibatches (the paper's recipe): rows in batches of `batch_size`, pairs in
    batches of `batch_size`, groups regrouped every epoch, `groups_per_batch` groups a batch."""
    if kind == "grouped":
        groups = random_groups(ex, group_size, rng)
        for s in range(0, groups.index.shape[0], groups_per_batch):
            yield Batch(groups.index[s : s + groups_per_batch], _mask(groups)[s : s + groups_per_batch])
        return
    index = np.arange(ex.groups.size) if kind == "pointwise" else (pairs or within_prompt_pairs(ex)).index
    perm = rng.permutation(index.shape[0])
    for s in range(0, perm.size, batch_size):
        yield Batch(index[perm[s : s + batch_size]])
