"""Training recipes for probes, validation by expected return, and feature (layer) selection.

recipe="paper": PAPER.md exactly: raw features, PyTorch's default init, AdamW (lr 5e-5, weight
decay 0.01), 150 epochs, batches of 1000 rows (pairs), or for grouped losses 100 groups of 10
samples of one prompt, regrouped every epoch.

recipe="fast" (default): standardised features, full-batch L-BFGS with an L2 penalty. The penalty
is chosen on held-out training prompts by the expected return at k of the selected sample, walking
the grid from the strongest penalty down (each fit warm-started from the previous one, so strong
penalties cost a few iterations) and stopping after `patience` penalties without improvement;
then the probe is refitted on all training prompts from the chosen solution. `select_folds` > 1
chooses the penalty by the mean over K folds of prompts instead of one held-out `select_frac`.
benchmarks/bench_probes.py measures both.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from qprobe.errors import ConfigError
from qprobe.probes.data import Batch, Examples, epoch_batches, full_batch, split_prompts

STD_FLOOR = 1e-6  # floor on a feature's standard deviation (constant features are left unscaled)

RECIPES = ("fast", "paper")


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Paper fields apply to recipe="paper", L-BFGS fields to recipe="fast"; `k` and
    `beta` define the validation metric (expected return of best-of-k, softmax(Q/beta))."""

    recipe: str = "fast"
    lr: float = 5e-5
    weight_decay: float = 0.01
    epochs: int = 150
    batch_size: int = 1000
    group_size: int = 10
    groups_per_batch: int = 100
    l2_grid: tuple[float, ...] = (10.0, 1.0, 0.1, 0.01, 0.001)
    select_frac: float = 0.25
    select_folds: int = 1
    patience: int = 1
    max_iter: int = 30
    k: int = 4
    beta: float = 0.0

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ConfigError(f"expected recipe in {list(RECIPES)}, got '{self.recipe}'")
        for name in ("epochs", "batch_size", "group_size", "groups_per_batch", "select_folds", "patience", "max_iter", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"expected {name} to be an integer >= 1, got {value!r}")
        if not (self.lr > 0 and self.weight_decay >= 0 and self.beta >= 0):
            raise ConfigError(f"expected lr > 0, weight_decay >= 0, beta >= 0, got {self.lr}, {self.weight_decay}, {self.beta}")
        grid = tuple(float(x) for x in self.l2_grid)
        if not grid or min(grid) < 0:
            raise ConfigError(f"expected a non-empty l2_grid of values >= 0, got {self.l2_grid!r}")
        object.__setattr__(self, "l2_grid", grid)
        if not 0.0 <= self.select_frac < 1.0:
            raise ConfigError(f"expected select_frac in [0, 1), got {self.select_frac!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["l2_grid"] = list(self.l2_grid)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"expected train options among {sorted(names)}, got unknown {unknown}")
        options: dict[str, Any] = {k: tuple(v) if k == "l2_grid" else v for k, v in d.items()}
        return cls(**options)


# -------------------------------------------------------------------------------- the loss
def resolve_loss(name: str, options: dict[str, Any]) -> tuple[Callable[..., Any], str]:
    """The registered loss function and its kind; unknown options are refused by name."""
    from qprobe.catalog import LOSSES
    from qprobe.probes.losses import loss_kind

    fn = LOSSES.get(name)
    kind = loss_kind(fn)
    allowed = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"expected options of loss '{name}' among {allowed}, got {unknown}")
    return fn, kind


def _loss_on(kind: str, fn: Callable[..., Any], options: dict[str, Any], s: Any, r: Any, batch: Batch) -> Any:
    """Feed one batch to the loss: s and r have the shape of batch.index."""
    import torch

    if kind == "pairwise":
        return fn(s[:, 0], s[:, 1], **options)  # [P] chosen, [P] rejected
    if kind == "grouped":
        return fn(s, r, torch.from_numpy(batch.mask), **options)  # [G, k]
    return fn(s, r, **options)  # [B]


# ----------------------------------------------------------------------------- the network
def _init_layers(shapes: list[tuple[int, int]], gen: Any) -> list[Any]:
    """PyTorch's default nn.Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from `gen`."""
    import torch

    layers = []
    for out, fan_in in shapes:
        bound = 1.0 / np.sqrt(fan_in)
        w = torch.empty(out, fan_in).uniform_(-bound, bound, generator=gen)
        b = torch.empty(out).uniform_(-bound, bound, generator=gen)
        layers += [w.requires_grad_(), b.requires_grad_()]
    return layers


def _forward(layers: list[Any], z: Any) -> Any:
    import torch

    n = len(layers) // 2
    for i in range(n):
        z = z @ layers[2 * i].T + layers[2 * i + 1]  # [N, out]
        if i < n - 1:
            z = torch.relu(z)
    return z[:, 0]  # [N]


def _to_params(layers: list[Any]) -> dict[str, np.ndarray]:
    out = {}
    for i in range(len(layers) // 2):
        out[f"layers.{i}.weight"] = layers[2 * i].detach().numpy().copy()
        out[f"layers.{i}.bias"] = layers[2 * i + 1].detach().numpy().copy()
    return out


def _scores_np(layers: list[Any], z: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return _forward(layers, torch.from_numpy(z)).numpy().astype(np.float64)


def mean_expected_return(scores: np.ndarray, ex: Examples, k: int, beta: float = 0.0) -> float:
    """Mean over prompts of the exact expected return of best-of-k selection by softmax(Q/beta)."""
    from qprobe.metrics import group_expected_return

    _, values = group_expected_return(scores, ex.rewards, ex.groups, k, beta)
    return float(np.mean(values))


# ------------------------------------------------------------------------------- recipes
def _fit_lbfgs(layers, ex: Examples, kind, fn, options, l2: float, max_iter: int) -> tuple[float, int]:
    """Full-batch L-BFGS (strong Wolfe line search) on loss + l2 * sum of squared weights."""
    import torch

    batch = full_batch(kind, ex)
    z = torch.from_numpy(ex.features)  # [N, d]
    r_all = torch.from_numpy(ex.rewards.astype(np.float32))  # [N]
    idx = torch.from_numpy(batch.index)
    weights = layers[0::2]
    opt = torch.optim.LBFGS(layers, lr=1.0, max_iter=max_iter, history_size=10,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> Any:
        opt.zero_grad()
        s = _forward(layers, z)[idx]  # shape of batch.index
        loss = _loss_on(kind, fn, options, s, r_all[idx], batch)
        if l2 > 0:
            loss = loss + l2 * sum((w * w).sum() for w in weights)
        loss.backward()
        return loss

    final = float(opt.step(closure).detach())
    return final, int(opt.state[opt._params[0]].get("n_iter", 0))


def _selection_folds(ex: Examples, cfg: TrainConfig, rng: np.random.Generator) -> list[tuple[Examples, Examples]]:
    """(fit, held-out) prompt splits on which the penalty is chosen: one split holding out
    `select_frac` of the prompts, or `select_folds` folds; none when there is nothing to choose."""
    from qprobe.probes.data import fold_prompts

    if len(cfg.l2_grid) < 2 or ex.n_prompts < 4 or (cfg.select_folds == 1 and cfg.select_frac == 0):
        return []
    if cfg.select_folds > 1:
        splits = fold_prompts(ex.groups, min(cfg.select_folds, ex.n_prompts), rng)
    else:
        splits = [split_prompts(ex.groups, cfg.select_frac, rng)]
    return [(ex.take(fit), ex.take(held)) for fit, held in splits]


def _fast(layers, ex: Examples, kind, fn, options, cfg: TrainConfig, rng: np.random.Generator) -> dict[str, Any]:
    grid = sorted(cfg.l2_grid, reverse=True)  # strong to weak penalty: warm starts stay stable
    path: list[dict[str, float]] = []
    l2 = grid[0]
    folds = _selection_folds(ex, cfg, rng)
    if folds:
        init = [t.detach().clone() for t in layers]
        states = [init] * len(folds)  # each fold's warm start along the penalty path
        best, best_state, worse = -np.inf, init, 0
        for value in grid:
            rets, losses, iters, flat = [], [], 0, 0
            for i, (fit, held) in enumerate(folds):
                for t, saved in zip(layers, states[i], strict=True):
                    t.data.copy_(saved)
                loss, it = _fit_lbfgs(layers, fit, kind, fn, options, value, cfg.max_iter)
                scores = _scores_np(layers, held.features)  # [N_held]
                rets.append(mean_expected_return(scores, held, cfg.k, cfg.beta))
                losses.append(loss)
                iters += it
                collapsed = np.ptp(scores) <= 1e-6 * (1.0 + np.abs(scores).max())
                flat += int(collapsed)
                # a probe the penalty collapsed to a constant (an MLP's zero is a stationary point
                # it cannot leave) restarts the next penalty from the init
                states[i] = init if collapsed else [t.detach().clone() for t in layers]
            ret = float(np.mean(rets))  # [folds] -> mean held-out return
            path.append({"l2": value, "select_return": ret, "train_loss": float(np.mean(losses)), "iterations": iters})
            if ret > best:  # ties keep the stronger penalty
                best, best_state, l2, worse = ret, states[0], value, 0
            elif flat < len(folds):  # every fold collapsed: not a try
                worse += 1
                if worse >= cfg.patience:  # early stopping along the penalty path
                    break
        for t, saved in zip(layers, best_state, strict=True):
            t.data.copy_(saved)
    loss, iters = _fit_lbfgs(layers, ex, kind, fn, options, l2, cfg.max_iter)
    return {"l2": l2, "l2_path": path, "train_loss": loss, "iterations": iters}


def _paper(layers, ex: Examples, kind, fn, options, cfg: TrainConfig, rng: np.random.Generator) -> dict[str, Any]:
    import torch

    z = torch.from_numpy(ex.features)  # [N, d]
    r_all = torch.from_numpy(ex.rewards.astype(np.float32))  # [N]
    pairs = full_batch(kind, ex) if kind == "pairwise" else None
    opt = torch.optim.AdamW(layers, lr=cfg.lr, weight_decay=cfg.weight_decay)
    epoch_loss = []
    for _ in range(cfg.epochs):
        total, count = 0.0, 0
        for batch in epoch_batches(kind, ex, rng, batch_size=cfg.batch_size, group_size=cfg.group_size,
                                   groups_per_batch=cfg.groups_per_batch, pairs=pairs):
            idx = torch.from_numpy(batch.index)
            s = _forward(layers, z[idx.reshape(-1)]).reshape(idx.shape)  # shape of batch.index
            loss = _loss_on(kind, fn, options, s, r_all[idx], batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, count = total + float(loss.detach()), count + 1
        epoch_loss.append(total / max(count, 1))
    return {"train_loss": epoch_loss[-1] if epoch_loss else float("nan"), "epoch_loss": epoch_loss}


def fit_probe(probe: Any, ex: Examples) -> None:
    """Train `probe` (a `Probe`) on `ex` and set its learned attributes."""
    import torch

    cfg = probe.train if probe.train is not None else TrainConfig()
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"expected train=TrainConfig(...), got {type(cfg).__name__}")
    fn, kind = resolve_loss(probe.loss, probe.loss_options)
    if ex.pairs is not None and kind != "pairwise":
        raise ConfigError(f"expected a pairwise loss (bt, margin_bt, dpo) to train on given pairs, got "
                          f"'{probe.loss}', a {kind} loss; pass --loss margin_bt (or bt)")
    standardize = cfg.recipe == "fast" if probe.standardize is None else bool(probe.standardize)
    start = time.perf_counter()
    mean = scale = None
    z = ex.features
    if standardize:
        mean = z.mean(axis=0, dtype=np.float64).astype(np.float32)  # [d]
        scale = np.maximum(z.std(axis=0, dtype=np.float64), STD_FLOOR).astype(np.float32)  # [d]
        z = (z - mean) / scale  # [N, d]
    ex = Examples(np.ascontiguousarray(z, dtype=np.float32), ex.rewards, ex.groups, ex.pairs)
    rng = np.random.default_rng(probe.seed)
    gen = torch.Generator().manual_seed(int(probe.seed))
    layers = _init_layers(probe.layer_shapes(z.shape[1]), gen)
    recipe = _paper if cfg.recipe == "paper" else _fast
    history = recipe(layers, ex, kind, fn, dict(probe.loss_options), cfg, rng)
    q = _scores_np(layers, ex.features)  # [N] the trained probe's scores on its training rows
    if kind == "pairwise":
        history["n_pairs"] = int(full_batch(kind, ex).index.shape[0])
    history.update(recipe=cfg.recipe, kind=kind, n_rows=int(z.shape[0]), n_prompts=ex.n_prompts,
                   seconds=time.perf_counter() - start,
                   q_min=float(q.min()) if q.size else None, q_max=float(q.max()) if q.size else None)
    probe._set_learned(_to_params(layers), mean, scale, history)


# ---------------------------------------------------------------------------- evaluation
def rerank_metrics(probe: Any, features: np.ndarray, rewards: np.ndarray, groups: np.ndarray, k: int,
             beta: float = 0.0) -> dict[str, float]:
    """The numbers that matter for reranking on some prompts: the probe's expected return at k,
    the mean reward (what a random pick gets, pass@1) and the best of k (pass@k for 0/1 rewards)."""
    from qprobe.probes.data import make_examples

    ex = make_examples(features, rewards, groups)
    scores = probe.score(ex.features).astype(np.float64)
    return {
        "expected_return": mean_expected_return(scores, ex, k, beta),
        "pass@1": mean_expected_return(np.zeros_like(scores), ex, 1),
        "pass@k": mean_expected_return(ex.rewards, ex, k, 0.0),
        "prompts": float(ex.n_prompts),
        "samples": float(ex.groups.size),
    }


def select_feature(candidates: dict[str, np.ndarray], rewards: np.ndarray, groups: np.ndarray,
                   make_probe: Callable[[], Any], *, frac: float = 0.25, k: int = 4, beta: float = 0.0,
                   seed: int = 0, pairs_of: Callable[[np.ndarray], np.ndarray] | None = None,
                   ) -> tuple[str, dict[str, float]]:
    """Pick the feature key (e.g. a layer) whose probe does best on held-out prompts.

    candidates: key -> features [N, d] (rows aligned with rewards and groups). Every key is
    trained by a fresh `make_probe()` on the same prompts and scored on the same held-out ones.
    `pairs_of(rows)`: the training pairs [P, 2] among those rows (numbered within them), for a
    pairwise loss on chosen pairs (`Probe.fit(pair_rows=...)`); None = all within-prompt pairs.
    Returns (best key, {key: held-out expected return}); ties go to the first key."""
    if not candidates:
        raise ConfigError("expected at least one feature key to choose from, got none")
    codes = np.unique(np.asarray(groups), return_inverse=True)[1]
    keep, held = split_prompts(codes, frac, np.random.default_rng(seed))
    if held.size == 0:
        raise ConfigError(f"expected a held-out fraction > 0 to compare features, got {frac}")
    table = {}
    for key, feats in candidates.items():
        pair_rows = None if pairs_of is None else pairs_of(keep)
        probe = make_probe().fit(feats[keep], rewards[keep], codes[keep], pair_rows=pair_rows)
        table[key] = rerank_metrics(probe, feats[held], rewards[held], codes[held], k, beta)["expected_return"]
    best = max(table, key=lambda key: table[key])
    return best, table
