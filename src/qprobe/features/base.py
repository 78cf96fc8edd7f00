"""The embedder interface: features of prompt+completion, one array per feature request."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from qprobe.core.types import Completion
from qprobe.errors import ConfigError
from qprobe.features.spec import FeatureRequest, FeatureSpec


class Embedder(ABC):
    """Computes features of (rendered prompt + completion) for one or more requests."""

    #: Back-end name recorded in the spec ("llamacpp", "transformers", "sentence-transformers", ...).
    name: str = ""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """At least `model` and `sha256` of the weights the features come from."""

    @abstractmethod
    def embed(
        self, text: str, completions: list[Completion], requests: list[FeatureRequest]
    ) -> dict[str, Any]:
        """For each request, keyed by `request.key`: an array [k, d] (pooling 'last'/'mean'),
        or a list of k arrays [t_i, d] (pooling 'tokens')."""

    def prepare(self, requests: list[FeatureRequest]) -> None:  # noqa: B027 (nothing to set up by default)
        """Called before generation with the requests `embed` will get: a back-end that can keep
        states while it generates (llama.cpp) sets itself up here, not under running sequences."""

    def spec(self, request: FeatureRequest, dim: int, dtype: str = "float32") -> FeatureSpec:
        ident = self.identity()
        return FeatureSpec(
            backend=self.name,
            model=str(ident.get("model", "")),
            sha256=str(ident.get("sha256", "")),
            layer=request.layer,
            pooling=request.pooling,
            dim=dim,
            dtype=dtype,
            embedder=request.embedder,
        )

    def token_pieces(self, completions: list[Completion]) -> list[list[str]]:
        """The text of each completion token whose state pooling 'tokens' returns: one string per
        state row, in order (an empty completion, whose one row is the last prompt token: [""])."""
        raise ConfigError(
            f"expected an embedder that can name its tokens (llamacpp, transformers, fake), got '{self.name}'"
        )

    def close(self) -> None:  # noqa: B027 (a no-op by default, on purpose)
        """Release the model."""


def pool(states: np.ndarray, pooling: str) -> np.ndarray:
    """Pool completion-token states [t, d] into [d] ('last', 'mean') or keep them ('tokens')."""
    if pooling == "last":
        return states[-1]  # [d]
    if pooling == "mean":
        return states.mean(axis=0)  # [d]
    return states  # [t, d]


def utf8_pieces(pieces: list[bytes]) -> list[str]:
    """Token byte pieces -> one string per token whose concatenation is the decoded text: a character
    split across tokens belongs to the token that completes it."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = [decoder.decode(p) for p in pieces]
    if out:
        out[-1] += decoder.decode(b"", final=True)
    return out
