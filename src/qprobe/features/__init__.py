"""Features: which hidden state of which model, pooled how, and the embedders that compute them."""

from __future__ import annotations

from typing import Any

from qprobe.features.base import Embedder, pool
from qprobe.features.spec import FeatureRequest, FeatureSpec

__all__ = ["Embedder", "FeatureRequest", "FeatureSpec", "make_embedder", "pool"]


def make_embedder(backend: Any, embedder: str = "", **options: Any) -> Embedder:
    """The embedder for a request: the back-end's own hidden states when `embedder` is empty,
    else an external model named 'minilm', 'st=PATH', 'openai=MODEL' or 'hf=PATH'."""
    from qprobe.catalog import EMBEDDERS, EXTERNAL_EMBEDDERS

    if not embedder:
        return EMBEDDERS.create(backend.name, backend, **options)  # type: ignore[no-any-return]
    kind, _, arg = embedder.partition("=")
    return EXTERNAL_EMBEDDERS.create(kind, arg or kind, **options)  # type: ignore[no-any-return]
