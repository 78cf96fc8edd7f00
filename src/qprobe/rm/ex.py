"""EX-RM: a bias-free linear head on the final-norm state of the LAST token of prompt + response,
the chat template's end tokens included (exrm-vs-imrm's `AutoModelForSequenceClassification`;
for Qwen the "\\n" after "<|im_end|>"). Loss -log sigmoid(r_c - r_r)."""

from __future__ import annotations

import torch

from qprobe.rm.base import Head, Sequence, linear_score


class ExplicitHead(Head):
    name = "ex"
    loss = "bt"

    def __init__(self, hidden_size: int, generator: torch.Generator | None = None) -> None:
        super().__init__(hidden_size, generator)
        self.score = linear_score(hidden_size, generator)

    def reward(self, seq: Sequence) -> torch.Tensor:
        return self.score(seq.final[-1].float())[0]  # v . h_T
