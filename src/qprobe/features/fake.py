"""Features for the fake back-end: the fake task's latent state plus layer-specific noise."""

from __future__ import annotations

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
                noise = text_rng("layer", str(req.layer), req.pooling, req.embedder, text, c.text)
                row = (state + 0.3 * noise.standard_normal(dim)).astype(np.float32)  # [d]
                rows.append(np.tile(row, (max(c.n_tokens, 1), 1)) if req.pooling == "tokens" else row)
            feats[req.key] = rows if req.pooling == "tokens" else np.stack(rows)  # [k, d]
        return feats
