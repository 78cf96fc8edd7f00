"""Features for the llama.cpp back-end, read inside llama.cpp for the tokens exactly as generated.

Layer numbering follows transformers' `hidden_states` (as `qprobe.features.hf` does): 0 is the
token embeddings, L the output of block L, and -1 (or n_layers, 24 for the default model) the
last block's output *after the final norm*, which is what llama.cpp's embeddings return. Every
layer comes from llama.cpp itself (the last from its embeddings, the others from its eval
callback: `LlamaCppBackend.capture`), for prompt tokens + `Completion.token_ids`:

- fast path: the back-end keeps the states of every token it fed while generating, so features
  of fresh completions cost nothing extra (the first prompt after a new set of layers is asked
  for goes through the next path, since the capture starts with the next decode);
- otherwise (completions from elsewhere, a resumed run, `qprobe embed`) the prompt is evaluated
  once and only the completions' tokens are decoded on top of it, several sequences per batch.

Pooling 'last' is the state at the last completion token, 'mean' the mean over completion
tokens, 'tokens' every completion token's state [t, d]; an empty completion uses the state at
the last prompt token. `layers_from="transformers"` takes the layers other than the last from
`TransformersEmbedder` on the same GGUF file instead (dequantised once per machine), as runs
made before the capture did; both carry the same weights hash.
"""

from __future__ import annotations

import contextlib
from typing import Any, cast

import numpy as np

from qprobe.core.types import Completion
from qprobe.errors import ConfigError
from qprobe.features.base import Embedder, pool, utf8_pieces
from qprobe.features.spec import FeatureRequest
from qprobe.generation.llamacpp import LlamaCppBackend
from qprobe.generation.llamacpp_capture import resolve_layer

FALLBACK_CHUNK = 128  # rows per llama_decode when re-evaluating completions (each row is an output)
LAYER_SOURCES = ("llamacpp", "transformers")

class LlamaCppEmbedder(Embedder):
    """Hidden states of a `LlamaCppBackend`'s model; `hf_options` go to the transformers embedder
    (used only with `layers_from="transformers"`)."""

    name = "llamacpp"

    def __init__(
        self,
        backend: LlamaCppBackend | None = None,
        layers_from: str = "llamacpp",
        hf_options: dict[str, Any] | None = None,
        **backend_options: Any,
    ) -> None:
        if layers_from not in LAYER_SOURCES:
            raise ConfigError(f"expected layers_from in {list(LAYER_SOURCES)}, got '{layers_from}'")
        self._owns = backend is None
        self.backend = backend if backend is not None else LlamaCppBackend(**backend_options)
        self.backend.capture_states = True
        self.layers_from = layers_from
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

    def index(self, layer: int) -> int:
        """The layer as a hidden_states index 0..n_layers (a one-line error when out of range)."""
        return resolve_layer(layer, self.backend.n_layers)

    def is_native(self, layer: int) -> bool:
        """Whether llama.cpp itself gives this layer (all of them, unless layers_from='transformers')."""
        idx = self.index(layer)
        return self.layers_from == "llamacpp" or idx == self.backend.n_layers

    def prepare(self, requests: list[FeatureRequest]) -> None:
        """Keep the states of these requests' layers while generating (nothing when none is native)."""
        native = [r for r in requests if self.is_native(r.layer)]
        self.backend.capture_states = bool(native)  # only pays off when llama.cpp's layers are asked for
        if native:
            self.backend.capture([self.index(r.layer) for r in native])  # a no-op unless the set changed

    def embed(
        self, text: str, completions: list[Completion], requests: list[FeatureRequest]
    ) -> dict[str, Any]:
        native = [r for r in requests if self.is_native(r.layer)]
        other = [r for r in requests if not self.is_native(r.layer)]
        if not self.backend.in_flight:  # else prepare() was called, and the context must stay
            self.prepare(requests)
        feats: dict[str, Any] = {}
        if native:
            layers = sorted({self.index(r.layer) for r in native})
            states = self.token_states(text, completions, layers)  # k dicts {layer: [t_i, d]}
            for req in native:
                rows = [pool(s[self.index(req.layer)], req.pooling) for s in states]
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

    def token_pieces(self, completions: list[Completion]) -> list[list[str]]:
        """Each completion token's text (special tokens spelled out), aligned with 'tokens' states."""
        return [utf8_pieces([self.backend.piece(t) for t in ids]) if ids else [""]
                for ids in (self.completion_ids(c) for c in completions)]

    def token_states(
        self, text: str, completions: list[Completion], layers: list[int] | None = None
    ) -> list[dict[int, np.ndarray]]:
        """States of each completion's tokens, k dicts {layer: [t_i, d] float32} for hidden_states
        indices `layers` (default: the last); an empty completion: [1, d], the last prompt token."""
        b = self.backend
        layers = [b.n_layers] if layers is None else list(layers)
        kept = b.captured.get(text, {})
        ids = [self.completion_ids(c) for c in completions]
        out: list[dict[int, np.ndarray] | None] = []
        for c, t in zip(completions, ids, strict=True):
            got = kept.get((c.seed, t))
            out.append(got if got is not None and all(L in got for L in layers) else None)
        prompt_states = kept.get("prompt")
        if prompt_states is not None and not all(L in prompt_states for L in layers):
            prompt_states = None
        todo = [i for i, s in enumerate(out) if s is None]
        self.stats["captured"] += len(completions) - len(todo)
        self.stats["evaluated"] += len(todo)
        if todo or (prompt_states is None and any(len(t) == 0 for t in ids)):
            fresh, prompt_states = self._evaluate(text, [ids[i] for i in todo])
            for i, s in zip(todo, fresh, strict=True):
                out[i] = s
        filled = cast(list[dict[int, np.ndarray]], out)  # every slot is set above
        return [
            {
                L: s[L].astype(np.float32, copy=False) if len(s[L]) else _row(prompt_states, L)  # [t, d]
                for L in layers
            }
            for s in filled
        ]

    def _evaluate(
        self, text: str, comps: list[tuple[int, ...]]
    ) -> tuple[list[dict[int, np.ndarray]], dict[int, np.ndarray]]:
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
        # never under running sequences, always in one KV stream (rows in batch order), never
        # with the policy's LoRA adapter (features are the base model's)
        with b.aside() if b.in_flight or not b.kv_unified or b.lora is not None else contextlib.nullcontext():
            return self._evaluate_groups(prompt, comps, groups)

    def _evaluate_groups(
        self, prompt: list[int], comps: list[tuple[int, ...]], groups: list[list[int]]
    ) -> tuple[list[dict[int, np.ndarray]], dict[int, np.ndarray]]:
        b = self.backend
        layers = (b.n_layers, *b.capture_layers)
        states: list[dict[int, np.ndarray]] = [{} for _ in comps]
        last: dict[int, np.ndarray] = {}
        if b._layer_capture is not None:
            b._layer_capture.enabled = True
        for group in groups:
            last = b.evaluate_prompt(prompt, max(1, len(group)), want_state=True) or {}
            b.set_embeddings(True)
            rows = [
                (tok, len(prompt) + j, s, True) for s, i in enumerate(group) for j, tok in enumerate(comps[i])
            ]
            where = [(i, j) for i in group for j in range(len(comps[i]))]
            buf = {i: {L: np.empty((len(comps[i]), b.dim), np.float32) for L in layers} for i in group}
            chunk = min(FALLBACK_CHUNK, b.batch_size)
            for start in range(0, len(rows), chunk):
                b.decode(rows[start : start + chunk])
                got = b.states(len(rows[start : start + chunk]))  # {layer: [m, d]}
                for r, (i, j) in enumerate(where[start : start + chunk]):
                    for L in layers:
                        buf[i][L][j] = got[L][r]
            for i in group:
                states[i] = buf[i]
        return states, last

    def close(self) -> None:
        if self._hf is not None:
            self._hf.close()
            self._hf = None
        if self._owns:
            self.backend.close()


def _row(states: dict[int, np.ndarray] | None, layer: int) -> np.ndarray:
    if states is None:  # pragma: no cover - token_states evaluates the prompt when needed
        raise ConfigError("expected the last prompt token's state, got none")
    return states[layer][None, :].astype(np.float32)  # [1, d]
