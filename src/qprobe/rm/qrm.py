"""Q-RM: a bias-free linear head on every response token's final-norm state (prompt excluded, end
tokens included), the reward is the mean over tokens; Q-RM's margin loss
-log sigmoid(0.2 (r_c - r_r) - 2.0) (`margin_bt` with its defaults)."""

from __future__ import annotations

import torch

from qprobe.rm.base import Head, Sequence, linear_score


class TokenHead(Head):
    name = "qrm"
    loss = "margin_bt"

    def __init__(self, hidden_size: int, generator: torch.Generator | None = None) -> None:
        super().__init__(hidden_size, generator)
        self.score = linear_score(hidden_size, generator)

    def token_scores(self, seq: Sequence) -> torch.Tensor:
        return self.score(seq.final[seq.prompt_len :].float())[:, 0]  # Z_t = v . h_t, [t]

    def reward(self, seq: Sequence) -> torch.Tensor:
        return self.token_scores(seq).mean()  # mean_t Z_t
