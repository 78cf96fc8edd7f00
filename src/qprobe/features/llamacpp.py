"""Features for the llama.cpp back-end: last layer from llama.cpp, other layers via transformers.

Layer numbering follows transformers' `hidden_states` (as `qprobe.features.hf` does): -1, or
n_layers (24 for the default model), is the output of the last block *after the final norm*,
which is what llama.cpp's embeddings return. Those come from llama.cpp itself, for the tokens
exactly as generated (prompt tokens + `Completion.token_ids`):

- fast path: the back-end keeps the state of every token it fed while generating (its context
  has `embeddings=True`, pooling NONE), so features of fresh completions cost nothing extra;
- otherwise (completions from elsewhere, a resumed run) the prompt is evaluated once and only
  the completions' tokens are decoded on top of it, several sequences per `llama_batch`.

Pooling 'last' is the state at the last completion token, 'mean' the mean over completion
tokens, 'tokens' every completion token's state [t, d]; an empty completion uses the state at
the last prompt token. Any other layer is delegated to `TransformersEmbedder` on the same GGUF
file (dequantised once per machine); its features carry the same weights hash.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qprobe.errors import ConfigError
from qprobe.features.base import Embedder, pool
from qprobe.features.spec import FeatureRequest
from qprobe.generation.base import Completion
from qprobe.generation.llamacpp import LlamaCppBackend

FALLBACK_CHUNK = 128  # rows per llama_decode when re-evaluating completions (each row is an output)


class LlamaCppEmbedder(Embedder):
    """Hidden states of a `LlamaCppBackend`'s model; `hf_options` go to the transformers embedder."""

    name = "llamacpp"

    def __init__(
        self,
        backend: LlamaCppBackend | None = None,
        hf_options: dict[str, Any] | None = None,
        **backend_options: Any,
    ) -> None:
        self._owns = backend is None
        self.backend = backend if backend is not None else LlamaCppBackend(**backend_options)
        self.backend.capture_states = True
        self.hf_options = dict(hf_options or {})
        self._hf: Any = None
        self.stats = {"captured": 0, "evaluated": 0}

    def identity(self) -> dict[str, Any]:
        ident = self.backend.identity()
        return {
            "model": ident["model"],
            "sha256": ident["sha256"],
            "dim": ident["dim"],
            "n_layers": ident["n_layers"],
        }

    def is_native(self, layer: int) -> bool:
        """Whether llama.cpp itself gives this layer (the last, after the final norm)."""
        n = self.backend.n_layers
        if not -(n + 1) <= layer <= n:
            raise ConfigError(
                f"expected a layer in [-{n + 1}, {n}] for this {n}-block model (0 = embeddings, "
                f"-1 or {n} = last block after the final norm), got {layer}"
            )
        return layer in (-1, n)

    def embed(
        self, text: str, completions: list[Completion], requests: list[FeatureRequest]
    ) -> dict[str, Any]:
        native = [r for r in requests if self.is_native(r.layer)]
        other = [r for r in requests if not self.is_native(r.layer)]
        # Capturing at generation time only pays off when the last layer is asked for.
        self.backend.capture_states = bool(native)
        feats: dict[str, Any] = {}
        if native:
            states = self.token_states(text, completions)  # k arrays [t_i, d]
            for req in native:
                rows = [pool(s, req.pooling) for s in states]
                feats[req.key] = (
                    rows if req.pooling == "tokens" else np.stack(rows).astype(np.float32)
                )  # [k, d]
        if other:
            feats.update(self.transformers().embed(text, completions, other))
        return feats

    def transformers(self) -> Any:
        """The transformers embedder on the same GGUF file (loaded on first use)."""
        if self._hf is None:
            from qprobe.features.hf import TransformersEmbedder

            self._hf = TransformersEmbedder(str(self.backend.path), **self.hf_options)
        return self._hf

    # ------------------------------------------------------------------ llama.cpp states
    def completion_ids(self, c: Completion) -> tuple[int, ...]:
        if c.token_ids is not None:
            return tuple(c.token_ids)
        return tuple(self.backend.tokenize(c.text, add_special=False, parse_special=True))

    def token_states(self, text: str, completions: list[Completion]) -> list[np.ndarray]:
        """Last-layer states of each completion's tokens, k arrays [t_i, d] float32
        (an empty completion: [1, d], the last prompt token)."""
        b = self.backend
        kept = b.captured.get(text, {})
        ids = [self.completion_ids(c) for c in completions]
        out: list[np.ndarray | None] = [kept.get((c.seed, t)) for c, t in zip(completions, ids, strict=True)]
        prompt_state = kept.get("prompt")
        todo = [i for i, s in enumerate(out) if s is None]
        self.stats["captured"] += len(completions) - len(todo)
        self.stats["evaluated"] += len(todo)
        if todo or (prompt_state is None and any(len(t) == 0 for t in ids)):
            fresh, prompt_state = self._evaluate(text, [ids[i] for i in todo])
            for i, s in zip(todo, fresh, strict=True):
                out[i] = s
        return [
            s.astype(np.float32, copy=False) if s is not None and len(s) else _row(prompt_state)  # [t, d]
            for s in out
        ]

    def _evaluate(self, text: str, comps: list[tuple[int, ...]]) -> tuple[list[np.ndarray], np.ndarray]:
        """Evaluate the prompt once, then the completions' tokens on top of it (KV reuse)."""
        b = self.backend
        prompt = b.prompt_tokens(text)
        room = b.n_ctx - len(prompt)
        longest = max((len(t) for t in comps), default=0)
        if longest > room:
            raise ConfigError(
                f"expected prompt + completion <= n_ctx={b.n_ctx} tokens, got {len(prompt)} + {longest}; "
                "raise the back-end's n_ctx"
            )
        groups: list[list[int]] = [[]]
        used = 0
        for i, t in enumerate(comps):  # greedy: as many completions as fit in the KV budget
            if groups[-1] and (used + len(t) > room or len(groups[-1]) >= b.n_seq_max):
                groups.append([])
                used = 0
            groups[-1].append(i)
            used += len(t)
        states: list[np.ndarray] = [np.zeros((0, b.dim), np.float32) for _ in comps]
        last: np.ndarray | None = None
        for group in groups:
            last = b.evaluate_prompt(prompt, max(1, len(group)), want_state=True)
            b.set_embeddings(True)
            rows = [
                (tok, len(prompt) + j, s, True) for s, i in enumerate(group) for j, tok in enumerate(comps[i])
            ]
            where = [(i, j) for i in group for j in range(len(comps[i]))]
            buf = {i: np.empty((len(comps[i]), b.dim), np.float32) for i in group}  # [t_i, d]
            chunk = min(FALLBACK_CHUNK, b.batch_size)
            for start in range(0, len(rows), chunk):
                b.decode(rows[start : start + chunk])
                for r, (i, j) in enumerate(where[start : start + chunk]):
                    buf[i][j] = b.state(r)
            for i in group:
                states[i] = buf[i]
        return states, last  # type: ignore[return-value]

    def close(self) -> None:
        if self._hf is not None:
            self._hf.close()
            self._hf = None
        if self._owns:
            self.backend.close()


def _row(state: np.ndarray | None) -> np.ndarray:
    if state is None:  # pragma: no cover - token_states evaluates the prompt when needed
        raise ConfigError("expected the last prompt token's state, got none")
    return state[None, :].astype(np.float32)  # [1, d]
