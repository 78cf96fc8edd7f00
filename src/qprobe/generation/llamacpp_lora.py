"""A LoRA adapter on the llama.cpp back-end's generation context, swapped at run time.

`set_lora(path, scale)` loads a GGUF LoRA adapter (`qprobe.rm.gguf_adapter` writes them) with
`llama_adapter_lora_init`, sets it on the generation context only (`llama_set_adapters_lora`;
llama.cpp applies it as W x + scale * alpha / r * B (A x), the same weights otherwise) and frees the
previous one; `set_lora(None)` goes back to the base model. The side context of `aside()`, where
the embedder evaluates, never gets the adapter: features stay those of the base model, which the
reward models read (issue 19). For the same reason the states of tokens fed while generating are
not kept while an adapter is on (`generation_captures`): the embedder evaluates them on the base
context instead.

The adapter is part of the back-end's identity (`lora`: its file's sha256, scale and path), so a
run sampled with an adapter never looks like one of the base model, and resuming it with another
adapter (or none) is refused as any other change of model.
"""

from __future__ import annotations

import ctypes
import math
import os
from pathlib import Path
from typing import Any

from qprobe.errors import BackendError, ConfigError
from qprobe.generation.models import file_sha256


class LlamaLora:
    """Needs `_lib`, `_model`, `_ctx`, `in_flight`, `captured` and `capture_states` from the class it
    is mixed into (`LlamaCppBackend`), which calls `_apply_lora()` on every new generation context
    and `_free_lora()` before it frees the model."""

    _lib: Any
    _model: Any
    _ctx: Any
    in_flight: int
    capture_states: bool
    captured: Any
    _lora: Any = None  # the llama_adapter_lora pointer
    lora: dict[str, Any] | None = None  # {"sha256", "scale", "path"} of the adapter on, or None

    def set_lora(self, path: str | os.PathLike[str] | None, scale: float = 1.0) -> None:
        """Sample with the GGUF LoRA adapter at `path` (scaled by `scale`) from now on; None: the base model."""
        if self.in_flight:
            raise BackendError(f"expected no sequences in flight to change the LoRA adapter, got {self.in_flight}; "
                               "finish or close the pool first")
        lib = self._lib
        if path is None:
            self._set_on_context(None, 0.0)
            self._release()
            self.lora = None
        else:
            try:
                scale = float(scale)
            except (TypeError, ValueError):
                scale = math.nan
            if not math.isfinite(scale):
                raise ConfigError(f"expected a finite number for lora_scale, got {scale!r}; e.g. lora_scale=1.0")
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"expected a GGUF LoRA adapter file, got nothing at '{p}'; "
                                  "write one with qprobe.rm.gguf_adapter.export_gguf_lora")
            sha = file_sha256(p, write_sidecar=False)
            adapter = lib.llama_adapter_lora_init(self._model, str(p).encode())
            if not adapter:
                raise BackendError(f"expected a LoRA adapter of this model's architecture and tensors, llama.cpp "
                                   f"refused '{p}' (run with --verbose for its reason); export it against "
                                   "the same base GGUF")
            try:
                self._set_on_context(adapter, scale)
            except BackendError:
                lib.llama_adapter_lora_free(adapter)
                raise
            self._release()
            self._lora = adapter
            self.lora = {"sha256": sha, "scale": scale, "path": str(p.resolve())}
        # cells computed under the old weights must not be reused
        lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
        self.captured.clear()

    def _set_on_context(self, adapter: Any, scale: float) -> None:
        lib = self._lib
        if adapter is None:
            rc = lib.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            adapters = (lib.llama_adapter_lora_p_ctypes * 1)(adapter)
            scales = (ctypes.c_float * 1)(scale)
            rc = lib.llama_set_adapters_lora(self._ctx, adapters, 1, scales)
        if rc != 0:
            raise BackendError(f"expected llama_set_adapters_lora to succeed, got code {rc}")

    def _apply_lora(self) -> None:
        """Put the current adapter on a freshly made generation context."""
        if self._lora is not None and self.lora is not None:
            self._set_on_context(self._lora, float(self.lora["scale"]))

    def _release(self) -> None:
        if self._lora is not None:
            self._lib.llama_adapter_lora_free(self._lora)
            self._lora = None

    def _free_lora(self) -> None:
        """Free the adapter (the contexts using it are gone or about to be)."""
        self._release()
        self.lora = None

    def generation_captures(self) -> bool:
        """Whether a pool keeps the states of the tokens it feeds (never under an adapter: they
        would be the adapted model's, and features are the base model's)."""
        return bool(self.capture_states) and self._lora is None
