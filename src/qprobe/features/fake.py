"""Features for the fake back-end: the fake task's latent state plus layer-specific noise.

Its tokens are the completion's whitespace-led words (`fake_pieces`), as many as the back-end
counted; pooling 'tokens' gives one state per token: the 'mean' feature plus a per-token jitter whose
mean over the tokens is zero, so the token states average to the 'mean' feature as a model's do.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from qprobe.core.types import Completion
from qprobe.features.base import Embedder
from qprobe.features.spec import FeatureRequest
from qprobe.generation.fake import FakeBackend
from qprobe.tasks.fake import fake_state, text_rng


class FakeEmbedder(Embedder):
    name = "fake"

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend

    def identity(self) -> dict[str, Any]:
        return self.backend.identity()

    def embed(
        self, text: str, completions: list[Completion], requests: list[FeatureRequest]
    ) -> dict[str, Any]:
        dim = self.backend.dim
        feats: dict[str, Any] = {}
        for req in requests:
            rows = []
            for c in completions:
                state = fake_state(text, c.text, dim)  # [d]
                # 'tokens' shares 'mean''s draw: the mean of the token states is the 'mean' feature.
                pooled = "mean" if req.pooling == "tokens" else req.pooling
                noise = text_rng("layer", str(req.layer), pooled, req.embedder, text, c.text)
                row = (state + 0.3 * noise.standard_normal(dim)).astype(np.float32)  # [d]
                rows.append(_token_rows(row, max(c.n_tokens, 1), noise) if req.pooling == "tokens" else row)
            feats[req.key] = rows if req.pooling == "tokens" else np.stack(rows)  # [k, d]
        return feats

    def token_pieces(self, completions: list[Completion]) -> list[list[str]]:
        return [fake_pieces(c.text, max(c.n_tokens, 1)) for c in completions]


def _token_rows(row: np.ndarray, t: int, rng: np.random.Generator) -> np.ndarray:
    jitter = rng.standard_normal((t, len(row)))  # [t, d]
    return (row + (jitter - jitter.mean(axis=0))).astype(np.float32)  # [t, d], mean over t == row


def fake_pieces(text: str, n: int) -> list[str]:
    """`n` strings that join to `text`: its whitespace-led words when there are `n` of them (always
    for the fake back-end's own completions), else `text` cut into `n` near-equal slices."""
    words = re.findall(r"\s*\S+", text)
    if words and len(words) == n:
        words[-1] += text[len("".join(words)):]  # trailing whitespace
        return words
    cuts = [round(i * len(text) / n) for i in range(n + 1)]
    return [text[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
