"""Probe training losses: pure functions of scores (and rewards), registered by name in
`qprobe.catalog.LOSSES` (the one registry: `LOSSES.get("pg")`, `qprobe ls`).

Each loss declares how the trainer must feed it through its `kind` attribute, so the trainer
never branches on a loss's name:

- ``pointwise``: ``(scores, rewards, mask=None)``, scores/rewards shaped [n] or [G, k];
- ``grouped``:   ``(scores, rewards, mask=None)``, [G, k]: the k samples of one prompt per row,
  `mask` [G, k] marks real samples in ragged groups (padding is ignored);
- ``pairwise``:  ``(chosen, rejected)``, [P]: the probe's scores of preferred and dispreferred
  samples.

Options are keyword-only, with the paper's defaults. Every loss returns a scalar tensor, the mean
over samples (pointwise), groups (grouped) or pairs (pairwise). Importing this module imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from qprobe.errors import ConfigError

POINTWISE, GROUPED, PAIRWISE = "pointwise", "grouped", "pairwise"
KINDS = (POINTWISE, GROUPED, PAIRWISE)

__all__ = [
    "KINDS", "bt_loss", "ce_loss", "dpo_loss", "listwise_loss", "loss_kind", "margin_bt_loss",
    "mse_loss", "pg_loss",
]


def _declare(kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.kind = kind  # type: ignore[attr-defined]
        return fn

    return mark


def loss_kind(fn: Callable[..., Any]) -> str:
    """How a loss is fed ('pointwise', 'grouped' or 'pairwise'); user losses set `fn.kind`."""
    kind = getattr(fn, "kind", None)
    if kind not in KINDS:
        raise ConfigError(
            f"expected a loss function with attribute kind in {list(KINDS)}, got {kind!r} on "
            f"{getattr(fn, '__name__', fn)}; set fn.kind = 'grouped' (or another kind) on it"
        )
    return kind


# ------------------------------------------------------------------------------------ checks
def _samples(scores: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor | None,
             grouped: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate shapes; returns (scores, rewards, mask) with a [G, k] shape when `grouped`
    (a 1-D input is one group) and a boolean mask of the same shape."""
    if not isinstance(scores, torch.Tensor) or not isinstance(rewards, torch.Tensor):
        raise ConfigError(
            f"expected torch tensors for scores and rewards, got {type(scores).__name__} and "
            f"{type(rewards).__name__}; wrap arrays with torch.as_tensor"
        )
    if scores.shape != rewards.shape or scores.ndim not in (1, 2) or scores.numel() == 0:
        raise ConfigError(
            f"expected scores and rewards of the same shape [n] or [G, k], got {tuple(scores.shape)} "
            f"and {tuple(rewards.shape)}"
        )
    if grouped and scores.ndim == 1:
        scores, rewards = scores[None], rewards[None]  # [1, k]
        mask = None if mask is None else mask[None]
    if mask is None:
        mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    elif mask.shape != scores.shape:
        raise ConfigError(f"expected mask of shape {tuple(scores.shape)}, got {tuple(mask.shape)}")
    mask = mask.to(torch.bool)
    rewards = rewards.to(scores.dtype)
    if grouped and not bool(mask.any(dim=-1).all()):
        raise ConfigError("expected at least one unmasked sample in every group, got an empty group; drop it")
    if not grouped and not bool(mask.any()):
        raise ConfigError("expected at least one unmasked sample, got none")
    return scores, rewards, mask


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum()


def _pairs(chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    if not isinstance(chosen, torch.Tensor) or not isinstance(rejected, torch.Tensor):
        raise ConfigError("expected torch tensors for chosen and rejected scores; wrap arrays with torch.as_tensor")
    if chosen.shape != rejected.shape or chosen.ndim != 1 or chosen.numel() == 0:
        raise ConfigError(
            f"expected chosen and rejected scores as 1-D tensors of equal length [P], got "
            f"{tuple(chosen.shape)} and {tuple(rejected.shape)}"
        )


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0:
        raise ConfigError(f"expected {name} > 0, got {value!r}")
    return value


def _masked_softmax(logits: torch.Tensor, mask: torch.Tensor, log: bool = False) -> torch.Tensor:
    """softmax over the unmasked entries of each row [G, k]; masked entries get 0 (log: -inf -> 0)."""
    filled = logits.masked_fill(~mask, float("-inf"))
    out = torch.log_softmax(filled, dim=-1) if log else torch.softmax(filled, dim=-1)
    return torch.where(mask, out, torch.zeros_like(out))


# ----------------------------------------------------------------------------- pointwise
@_declare(POINTWISE)
def mse_loss(scores: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_Q: mean squared error between Q and the reward, over the (unmasked) samples."""
    s, r, m = _samples(scores, rewards, mask, grouped=False)
    return _masked_mean((s - r) ** 2, m)  # Eq. 2, L_Q = E[(Q - r)^2]


@_declare(POINTWISE)
def ce_loss(scores: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_CE: binary cross-entropy of sigmoid(Q) against rewards in [0, 1] (soft labels allowed)."""
    s, r, m = _samples(scores, rewards, mask, grouped=False)
    if bool(((r < 0) | (r > 1))[m].any()):
        raise ConfigError("expected rewards in [0, 1] for the ce loss, got values outside; use mse or pg")
    bce = F.binary_cross_entropy_with_logits(s, r, reduction="none")  # Eq. 3, -r log s(Q) - (1-r) log(1-s(Q))
    return _masked_mean(bce, m)


# ------------------------------------------------------------------------------- grouped
@_declare(GROUPED)
def pg_loss(scores: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor | None = None, *,
            beta: float = 1.0, baseline: float | str | None = None) -> torch.Tensor:
    """L_PG: minus the reward expected under softmax(Q/beta) over each prompt's group, averaged over
    groups. `baseline`: None, a number, or "mean" (the mean reward of the batch, as the paper
    does); any constant within a group changes the value, never the gradient."""
    s, r, m = _samples(scores, rewards, mask, grouped=True)  # [G, k]
    beta = _check_positive("beta", beta)
    if baseline is None:
        b = torch.zeros((), dtype=s.dtype)
    elif baseline == "mean":
        b = _masked_mean(r, m)
    elif isinstance(baseline, (int, float)):
        b = torch.tensor(float(baseline), dtype=s.dtype)
    else:
        raise ConfigError(f"expected baseline None, a number or 'mean', got {baseline!r}")
    rho = _masked_softmax(s / beta, m)  # Eq. 4, rho_i = f(a_i) / sum_j f(a_j), f = exp(Q/beta); [G, k]
    return -(rho * (r - b)).sum(dim=-1).mean()  # Eq. 5, -E_x sum_i (r_i - b) rho_i


@_declare(GROUPED)
def listwise_loss(scores: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor | None = None, *,
                  beta: float = 1.0, tau: float = 0.1) -> torch.Tensor:
    """Listwise within-prompt loss (ours, not in the paper): per group, the KL divergence from the
    target softmax(r/tau) to the policy softmax(Q/beta), weighted by the group's reward range.

    The log-likelihood form keeps a gradient when the policy is confidently wrong (where L_PG's
    softmax saturates); groups whose samples all have the same reward carry no ranking
    information and contribute 0; a constant added to a group's rewards changes nothing."""
    s, r, m = _samples(scores, rewards, mask, grouped=True)  # [G, k]
    beta, tau = _check_positive("beta", beta), _check_positive("tau", tau)
    log_target = _masked_softmax(r / tau, m, log=True)  # [G, k]
    log_policy = _masked_softmax(s / beta, m, log=True)  # [G, k]
    kl = (log_target.exp() * (log_target - log_policy)).sum(dim=-1)  # [G]
    big = torch.finfo(r.dtype).max
    spread = r.masked_fill(~m, -big).amax(dim=-1) - r.masked_fill(~m, big).amin(dim=-1)  # [G]
    return (spread * kl).mean()


# ------------------------------------------------------------------------------ pairwise
@_declare(PAIRWISE)
def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """L_QP: Bradley-Terry, -log sigmoid(Q_w - Q_l), averaged over pairs."""
    _pairs(chosen, rejected)
    return -F.logsigmoid(chosen - rejected).mean()  # Eq. 6-7


@_declare(PAIRWISE)
def margin_bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, beta: float = 0.2,
                   gamma: float = 2.0) -> torch.Tensor:
    """Q-RM's loss: -log sigmoid(beta (Q_w - Q_l) - gamma), averaged over pairs."""
    _pairs(chosen, rejected)
    beta = _check_positive("beta", beta)
    return -F.logsigmoid(beta * (chosen - rejected) - float(gamma)).mean()  # Q-RM Eq., margin BT


@_declare(PAIRWISE)
def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, others: torch.Tensor | None = None,
             others_mask: torch.Tensor | None = None, *, alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """App. B: -log sigmoid(alpha (rho(a_w) - rho(a_l))), rho the softmax(Q/beta) weight of a candidate
    among {a_w, a_l, a_3..a_k}; `others` [P, m] are the extra candidates' scores (optional,
    `others_mask` [P, m] for ragged sets). alpha is not given in the paper; 1.0 here."""
    _pairs(chosen, rejected)
    alpha, beta = _check_positive("alpha", alpha), _check_positive("beta", beta)
    cand = torch.stack([chosen, rejected], dim=1)  # [P, 2]
    mask = torch.ones(cand.shape, dtype=torch.bool)
    if others is not None:
        if others.ndim != 2 or others.shape[0] != chosen.shape[0]:
            raise ConfigError(f"expected others of shape [P={chosen.shape[0]}, m], got {tuple(others.shape)}")
        om = torch.ones(others.shape, dtype=torch.bool) if others_mask is None else others_mask.to(torch.bool)
        cand, mask = torch.cat([cand, others], dim=1), torch.cat([mask, om], dim=1)  # [P, 2 + m]
    rho = _masked_softmax(cand / beta, mask)  # Eq. 19/21, rho_theta(a, {others}); [P, 2 + m]
    return -F.logsigmoid(alpha * (rho[:, 0] - rho[:, 1])).mean()  # Eq. 18/20, -E log p~

