"""The REINFORCE equations of Q-RM's policy training (homzer/Q-RM, PAPER.md "Q-RM"), one function each.

A chunk is the rollouts of one step (one sample per prompt at temperature 1). Each rollout's
actions are its generated tokens, then the end token when it stopped (`Policy.actions`). Every
reward source gives raw per-action values Z [t_i] per rollout:
  - Q-RM: the token probe's score of each action token's state (the end token included);
  - terminal rewards (oracle, ORM = last-token probe score, Q-probe value): the sequence's value
    R_i copied onto each of its tokens, as the authors' buffer does with `use_last_token_reward`
    (every valid token gets the last token's score, then the same std scaling). With no discount,
    the return of every token of a terminally rewarded sequence is R_i, so this is plain REINFORCE.
Then r = eos_rule(scale_by_std(Z)) and the loss is -mean over valid tokens of r_t log pi(a_t): no
KL penalty, no baseline, no discount (the authors' "vanilla" policy-gradient trainer).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qprobe.errors import DataError


def _check(z: Sequence[np.ndarray]) -> list[np.ndarray]:
    out = [np.asarray(x, dtype=np.float64).reshape(-1) for x in z]
    if not out or any(x.size == 0 for x in out):
        raise DataError(f"expected at least one rollout, each with >= 1 action token, got lengths "
                        f"{[x.size for x in out]}")
    if not all(np.all(np.isfinite(x)) for x in out):
        raise DataError("expected finite raw rewards, got NaN or infinity; check the reward model's scores")
    return out


def terminal_values(values: Sequence[float], lengths: Sequence[int]) -> list[np.ndarray]:
    """Z_{i,t} = R_i for every action token t of rollout i (a terminal reward on every token)."""
    if len(values) != len(lengths):
        raise DataError(f"expected one value per rollout, got {len(values)} values for {len(lengths)} rollouts")
    return [np.full(int(n), float(v)) for v, n in zip(values, lengths, strict=True)]


def scale_by_std(z: Sequence[np.ndarray]) -> list[np.ndarray]:
    """r_t = Z_t / std(Z), the std (population, numpy's) over all valid tokens of the chunk, no mean
    subtracted. A chunk whose values are all equal has std 0 and is left unscaled (the authors'
    code would divide by zero): all-zero oracle rewards then give a zero loss."""
    z = _check(z)
    std = float(np.concatenate(z).std())
    return [x.copy() for x in z] if std == 0.0 else [x / std for x in z]


def eos_rule(r: Sequence[np.ndarray]) -> list[np.ndarray]:
    """r_T <- mean_t r_t for each rollout's last action token T (its end token; the last generated
    token when it was cut at max_new_tokens), the mean taken before the replacement, r_T included
    (the authors' `re_scoring_eos_rewards`, applied after the std scaling)."""
    out = [x.copy() for x in _check(r)]
    for x in out:
        x[-1] = x.mean()
    return out


def token_rewards(z: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The per-token rewards REINFORCE uses: eos_rule(scale_by_std(Z)). For terminal values the EOS
    rule changes nothing (a constant row's mean is itself)."""
    return eos_rule(scale_by_std(z))


def reinforce_loss(logprobs: Sequence, rewards: Sequence, n_tokens: int | None = None):  # -> torch 0-d tensor
    """L = -(1/N) sum_i sum_t r_{i,t} log pi(a_{i,t}), N = the number of valid tokens (the chunk's total).

    `logprobs` [t_i] tensors (differentiable), `rewards` [t_i] arrays or tensors. `n_tokens` is N when
    the sequences are given one at a time (the step backpropagates one rollout at a time to bound
    memory; the per-sequence terms with N = the chunk's total sum to the chunk's loss)."""
    import torch

    if len(logprobs) != len(rewards) or not logprobs:
        raise DataError(f"expected one reward row per log-probability row, got {len(rewards)} and {len(logprobs)}")
    total = torch.zeros((), dtype=torch.float64, device=logprobs[0].device)
    count = 0
    for lp, r in zip(logprobs, rewards, strict=True):
        r_t = torch.as_tensor(np.asarray(r, dtype=np.float64), device=lp.device)  # [t]
        if r_t.shape != lp.shape:
            raise DataError(f"expected rewards of shape {tuple(lp.shape)} (one per action token), got {tuple(r_t.shape)}")
        total = total + (r_t * lp.double()).sum()
        count += int(lp.numel())
    n = count if n_tokens is None else int(n_tokens)
    if n < 1:
        raise DataError(f"expected n_tokens >= 1, got {n}")
    return -total / n
