"""Hidden-state features from a transformers causal LM, by a forward hook on one block.

Signature::

    TransformersEmbedder(model="", *, gguf_file=None, dtype="bfloat16", device=None,
                         batch_size=8, share_prompt=True)

`model` is one of:
  - a back-end object: a `TransformersBackend` (its loaded model is reused) or any back-end with
    a `model_path` / `model` string naming the same weights (vLLM; registry EMBEDDERS);
  - a string: a `.gguf` file, a transformers folder or hub id, "" / "default" for the packaged
    default GGUF (registry EXTERNAL_EMBEDDERS 'hf=PATH'; the llama.cpp embedder for layers other
    than the last: `TransformersEmbedder(model=<gguf path>)`).
GGUF files are dequantised once per machine and cached (`qprobe.generation.hf_load`).

Layer numbering follows transformers' `hidden_states`: 0 is the embedding output (the input of
block 1), L in 1..n-1 is the output of decoder block L (1-based), and n == -1 is the output of
the last block *after the final norm* (Qwen2/Llama: `model.norm`), which is what transformers
puts in `hidden_states[-1]` and what llama.cpp's embeddings return. Negative L counts from n:
-2 is the output of block n-1, before any norm. Only the requested layers are captured (a hook),
and the forward pass stops right after the highest of them: blocks above it and the LM head
never run.

Tokens: the prompt is tokenised as generation does (special tokens parsed, BOS added unless the
text starts with it), the completion from `Completion.token_ids` when they decode to its text
(trailing end-of-generation tokens dropped), else from its text with no special tokens added.
Pooling 'last' is the state at the last completion token, 'mean' the mean over completion
tokens, 'tokens' every completion token's state [t, d]. An empty completion uses the state at
the last prompt token (one row for 'tokens').

With `share_prompt` (default) the prompt is run once and its key/value cache repeated for the
k completions, which then run as one right-padded batch (positions continue from the prompt
length, padding is masked). Otherwise one batch of prompt+completion sequences, right padded.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from qprobe.core.types import Completion
from qprobe.errors import ConfigError
from qprobe.features.base import Embedder, pool
from qprobe.features.spec import FeatureRequest
from qprobe.generation.hf_load import (
    LoadedLM,
    completion_ids,
    decoder_blocks,
    encode_prompt,
    final_norm,
    kv_cache,
    load_causal_lm,
)


class _Stop(Exception):
    """Raised by the hook of the highest requested layer: nothing above it is needed."""


class HookCapture:
    """Forward hooks that keep the hidden states of the requested layers (hidden_states indexing)."""

    def __init__(self, model: Any, layers: list[int], stop: bool = True) -> None:
        self.blocks = decoder_blocks(model)
        self.n = len(self.blocks)
        self.layers = sorted({self.resolve(L) for L in layers})
        self.stop = stop
        self.out: dict[int, Any] = {}
        self._handles: list[Any] = []
        self._model = model

    def resolve(self, layer: int) -> int:
        n = self.n
        idx = layer + n + 1 if layer < 0 else layer
        if not 0 <= idx <= n:
            raise ConfigError(
                f"expected a layer in [-{n + 1}, {n}] for this {n}-block model (0 = embeddings, "
                f"-1 = last block after the final norm), got {layer}"
            )
        return idx

    def _hook(self, idx: int, is_pre: bool) -> Any:
        top = idx == self.layers[-1]

        def fn(module: Any, args: Any, kwargs_or_out: Any = None, out: Any = None) -> None:
            if is_pre:  # (module, args, kwargs): the input of block 1
                h = args[0] if args else kwargs_or_out["hidden_states"]
            else:
                h = out if out is not None else kwargs_or_out
                h = h[0] if isinstance(h, tuple) else h
            self.out[idx] = h  # [B, T, d]
            if top and self.stop:
                raise _Stop

        return fn

    def __enter__(self) -> HookCapture:
        norm = final_norm(self._model)
        for idx in self.layers:
            if idx == 0:
                h = self.blocks[0].register_forward_pre_hook(self._hook(0, True), with_kwargs=True)
            elif idx == self.n and norm is not None:
                h = norm.register_forward_hook(self._hook(idx, False))
            else:
                h = self.blocks[idx - 1].register_forward_hook(self._hook(idx, False))
            self._handles.append(h)
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def run(self, fn: Any) -> dict[int, Any]:
        """Call `fn()` (a forward pass), returning the captured {layer: [B, T, d]}."""
        self.out = {}
        try:
            fn()
        except _Stop:
            pass
        return dict(self.out)


class TransformersEmbedder(Embedder):
    """Hidden states of any layer of a transformers causal LM (see the module docstring)."""

    name = "transformers"

    def __init__(
        self,
        model: Any = "",
        *,
        gguf_file: str | None = None,
        dtype: str = "bfloat16",
        device: str | None = None,
        batch_size: int = 8,
        share_prompt: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"expected batch_size >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.share_prompt = bool(share_prompt)
        self._owns = True
        lm = getattr(model, "lm", None)
        if isinstance(lm, LoadedLM):  # a TransformersBackend: same weights, already loaded
            self.lm, self._owns = lm, False
        else:
            if not isinstance(model, str):  # another back-end (vLLM): load the same weights
                gguf_file = gguf_file or getattr(model, "gguf_file", None)
                dtype = getattr(model, "hf_dtype", dtype)
                model = str(getattr(model, "model_path", None) or getattr(model, "model", ""))
            self.lm = load_causal_lm(model, gguf_file=gguf_file, dtype=dtype, device=device)
        self.tokenizer = self.lm.tokenizer

    def identity(self) -> dict[str, Any]:
        return self.lm.identity()

    def n_layers(self) -> int:
        return len(decoder_blocks(self.lm.model))

    def embed(
        self, text: str, completions: list[Completion], requests: list[FeatureRequest]
    ) -> dict[str, Any]:
        if not requests:
            return {}
        prompt = encode_prompt(self.tokenizer, text)
        comps = [completion_ids(self.tokenizer, c) for c in completions]
        states = self.token_states(prompt, comps, [r.layer for r in requests])
        feats: dict[str, Any] = {}
        for req in requests:
            rows = [pool(s, req.pooling) for s in states[req.layer]]
            feats[req.key] = rows if req.pooling == "tokens" else np.stack(rows).astype(np.float32)  # [k, d]
        return feats

    def token_pieces(self, completions: list[Completion]) -> list[list[str]]:
        """Each completion token's text, aligned with 'tokens' states (see `decoded_pieces`)."""
        return [decoded_pieces(self.tokenizer, ids) if ids else [""]
                for ids in (completion_ids(self.tokenizer, c) for c in completions)]

    def token_states(
        self, prompt: list[int], comps: list[list[int]], layers: list[int]
    ) -> dict[int, list[np.ndarray]]:
        """{layer: k arrays [t_i, d] float32} of completion-token states (empty -> last prompt token)."""
        import torch

        base = self.lm.model.get_decoder() if hasattr(self.lm.model, "get_decoder") else self.lm.model
        layers = list(dict.fromkeys(layers))
        out: dict[int, list[np.ndarray]] = {L: [] for L in layers}
        with torch.inference_mode(), HookCapture(self.lm.model, layers) as cap:
            idx = {L: cap.resolve(L) for L in layers}
            if self.share_prompt:
                chunks = self._shared_prompt(base, cap, prompt, comps)
            else:
                chunks = self._full_pass(base, cap, prompt, comps)
            for got in chunks:  # one dict {resolved layer: k_chunk arrays} per chunk, in order
                for L in layers:
                    out[L].extend(got[idx[L]])
        return out

    def _shared_prompt(self, base: Any, cap: HookCapture, prompt: list[int], comps: list[list[int]]) -> Any:
        import torch
        from transformers import DynamicCache

        dev = self.lm.device
        p_ids = torch.tensor([prompt], device=dev)  # [1, P]
        cache = DynamicCache(config=self.lm.model.config)
        got = cap.run(lambda: base(input_ids=p_ids, **kv_cache(base, cache), use_cache=True))
        last_prompt = {i: _f32(h[0, -1:]) for i, h in got.items()}  # [1, d]
        P = len(prompt)
        for start in range(0, len(comps), self.batch_size):
            chunk = comps[start : start + self.batch_size]
            lens = [len(c) for c in chunk]
            T = max(lens)
            res: dict[int, list[np.ndarray]] = {i: [] for i in cap.layers}
            if T > 0:
                ids = torch.zeros((len(chunk), T), dtype=torch.long, device=dev)  # [b, T]
                mask = torch.zeros((len(chunk), P + T), dtype=torch.long, device=dev)  # [b, P+T]
                mask[:, :P] = 1
                for r, c in enumerate(chunk):
                    ids[r, : len(c)] = torch.tensor(c, dtype=torch.long)
                    mask[r, P : P + len(c)] = 1
                kv = copy.deepcopy(cache)
                kv.batch_repeat_interleave(len(chunk))
                pos = torch.arange(P, P + T, device=dev).expand(len(chunk), T)  # [b, T]
                got = cap.run(
                    lambda ids=ids, mask=mask, kv=kv, pos=pos: base(
                        input_ids=ids,
                        attention_mask=mask,
                        position_ids=pos,
                        **kv_cache(base, kv),
                        use_cache=True,
                    )
                )
                states = {i: _f32(h) for i, h in got.items()}  # [b, T, d]
            for i in cap.layers:
                for r, n in enumerate(lens):
                    res[i].append(states[i][r, :n] if n else last_prompt[i])  # [t, d]
            yield res

    def _full_pass(self, base: Any, cap: HookCapture, prompt: list[int], comps: list[list[int]]) -> Any:
        import torch

        dev = self.lm.device
        P = len(prompt)
        for start in range(0, len(comps), self.batch_size):
            chunk = comps[start : start + self.batch_size]
            lens = [len(c) for c in chunk]
            T = P + max(lens)
            ids = torch.zeros((len(chunk), T), dtype=torch.long, device=dev)  # [b, T], right padded
            mask = torch.zeros((len(chunk), T), dtype=torch.long, device=dev)
            for r, c in enumerate(chunk):
                ids[r, : P + len(c)] = torch.tensor(prompt + c, dtype=torch.long)
                mask[r, : P + len(c)] = 1
            got = cap.run(
                lambda ids=ids, mask=mask: base(input_ids=ids, attention_mask=mask, use_cache=False)
            )
            states = {i: _f32(h) for i, h in got.items()}  # [b, T, d]
            # positions come from the lengths, never from searching for a pad id
            yield {
                i: [s[r, P : P + n] if n else s[r, P - 1 : P] for r, n in enumerate(lens)]
                for i, s in states.items()
            }

    def close(self) -> None:
        if self._owns:
            self.lm = None  # type: ignore[assignment]


def decoded_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """One string per token that joins to the decoded text: the growth of the decoded prefix (a
    character split across tokens belongs to the token that completes it)."""
    out: list[str] = []
    prev = ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd") and i < len(ids) - 1:
            out.append("")  # an unfinished character: wait for the token that completes it
            continue
        out.append(text[len(prev):] if text.startswith(prev) else tokenizer.decode([ids[i]]))
        prev = text
    return out


def _f32(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy()
