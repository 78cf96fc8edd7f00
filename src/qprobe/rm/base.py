"""The interface of a reward-model head: a reward (one scalar) from one sequence's final states.

A head is a `torch.nn.Module` (its parameters train with the adapters) with three class
attributes: `name`, `loss` (a pairwise loss of `qprobe.catalog.LOSSES`, applied to
(r_chosen [B], r_rejected [B]); the trainer never branches on it) and `needs_reference` (the
trainer then caches pi_ref's log-probabilities of the response tokens once, adapters off).
A new head is one module with one subclass, registered in `qprobe.catalog.RM_HEADS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from qprobe.errors import ConfigError


@dataclass
class Sequence:
    """One prompt + response after the trunk: what a head reads."""

    final: torch.Tensor  # [T, d] final-norm states of prompt + response
    ids: list[int]  # [T] token ids
    prompt_len: int  # P: response tokens are ids[P:]
    trunk: Any  # the Trunk, for the LM head (`response_logprobs`)
    reference: torch.Tensor | None = None  # [T - P] pi_ref log-probs of the response tokens

    def response_logprobs(self) -> torch.Tensor:
        """log pi_theta of the response tokens, [T - P]."""
        return self.trunk.logprobs(self.final, self.ids, self.prompt_len)  # type: ignore[no-any-return]


class Head(torch.nn.Module):
    """A reward from a `Sequence` (see the module docstring)."""

    name: ClassVar[str] = ""
    loss: ClassVar[str] = "bt"
    needs_reference: ClassVar[bool] = False

    def __init__(self, hidden_size: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ConfigError(f"expected a hidden size >= 1, got {hidden_size}")
        self.hidden_size = int(hidden_size)

    def reward(self, seq: Sequence) -> torch.Tensor:  # 0-d tensor
        raise NotImplementedError


def linear_score(hidden_size: int, generator: torch.Generator | None) -> torch.nn.Linear:
    """A bias-free Linear(d, 1), weights N(0, 0.02^2) like a transformers score head (initializer_range)."""
    lin = torch.nn.Linear(hidden_size, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1, hidden_size, generator=generator) * 0.02)
    return lin
