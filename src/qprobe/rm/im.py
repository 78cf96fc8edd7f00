"""IM-RM: the reward is read from log-probabilities, no head parameters:
r = 0.01 * sum over response tokens (template end tokens included) of log pi_theta - log pi_ref,
pi_ref = the same model with the adapters switched off (cached once per sequence).
Loss -log sigmoid(r_c - r_r)."""

from __future__ import annotations

import torch

from qprobe.errors import ConfigError
from qprobe.rm.base import Head, Sequence

BETA = 0.01  # exrm-vs-imrm's coefficient on the log-ratio


class ImplicitHead(Head):
    name = "im"
    loss = "bt"
    needs_reference = True

    def reward(self, seq: Sequence) -> torch.Tensor:
        if seq.reference is None:
            raise ConfigError("expected pi_ref's log-probabilities for an IM-RM reward, got none")
        return BETA * (seq.response_logprobs() - seq.reference).sum()  # 0.01 sum_t log pi/pi_ref
