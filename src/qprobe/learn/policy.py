"""The policy that learns: a `Trunk` (LoRA on the top blocks), sampled by llama.cpp or transformers.

Sampling ("sampler"):
  - "transformers": `TransformersBackend` on the trunk's own model, adapters on (they are injected
    in place): exact, slow on a CPU; the path of tiny models and tests.
  - "llamacpp": the batched llama.cpp back-end on the base GGUF with the current adapter loaded at
    run time: `qprobe.rm.gguf_adapter.export_gguf_lora(trunk, out, base_gguf=...)` writes the
    adapter, `LlamaCppBackend.set_lora(path)` loads it (the llama.cpp back-end's own features stay
    the base model's). Its texts may differ from transformers' in the rounding of batched decoding.

Actions (what the loss sees): the rendered prompt's ids as generation encodes them, then the
completion's ids (`completion_ids`: the generated ids, or the text re-tokenised when a stop string
began inside a token), then the end token when the completion stopped (finish "stop": EOS, or a stop
string, whose tokens are cut from the text and replaced by the end token: what the policy learns to
end with). A completion cut at max_new_tokens has no end token.

log pi (`logprobs`): the bottom blocks see no adapter, so their states are computed without
gradient (`Trunk.bottom_states`); the top blocks, the final norm and the LM head run with gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qprobe.core.types import Completion, Prompt
from qprobe.errors import ConfigError
from qprobe.generation.base import GenRequest, SamplingConfig, generate_many
from qprobe.generation.hf_load import completion_ids, encode_prompt
from qprobe.rm.trunk import Trunk

SAMPLERS = ("transformers", "llamacpp")


@dataclass(frozen=True)
class Rollout:
    """One sampled completion with the ids the loss and the rewards read."""

    prompt: Prompt
    text: str  # the rendered prompt
    completion: Completion
    prompt_ids: tuple[int, ...]
    action_ids: tuple[int, ...]
    ended: bool  # whether the last action is the end token

    @property
    def n_actions(self) -> int:
        return len(self.action_ids)


def end_token_id(lm: Any) -> int:
    """The end token the policy learns to stop with: the generation config's first EOS, else the
    tokenizer's."""
    eos: Any = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    eos = eos if eos is not None else lm.tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("expected a model with an end-of-sequence token, got none in its generation config "
                          "or tokenizer; use a model that has one")
    return int(eos)


class Policy:
    """`trunk` sampled with `sampler` (see the module docstring). `gguf`: the base GGUF llama.cpp
    loads (default: the packaged model); `workdir`: where the exported adapter is written."""

    def __init__(self, trunk: Trunk, sampler: str = "transformers", *, gguf: str | None = None,
                 workdir: Path | None = None, backend_options: dict[str, Any] | None = None) -> None:
        if sampler not in SAMPLERS:
            raise ConfigError(f"expected a sampler in {list(SAMPLERS)}, got '{sampler}'")
        from qprobe.generation.hf import TransformersBackend

        self.trunk, self.sampler = trunk, sampler
        self.tokenizer = trunk.lm.tokenizer
        hf_options = dict(backend_options or {}) if sampler == "transformers" else {}
        self.hf = TransformersBackend(lm=trunk.lm, **hf_options)
        self.end_id = end_token_id(trunk.lm)
        self.gguf, self.workdir = gguf, workdir
        self._llama: Any = None
        self._llama_options = dict(backend_options or {}) if sampler == "llamacpp" else {}
        self._exported_for: int | None = None

    # ---------------------------------------------------------------------------- sampling
    def render(self, prompt: Prompt) -> str:
        return self.hf.render(prompt)

    def _backend(self, version: int) -> Any:
        if self.sampler == "transformers":
            return self.hf
        from qprobe.catalog import BACKENDS

        if self._llama is None:
            self._check_gguf()
            opts = dict(self._llama_options)
            if self.gguf:
                opts["model"] = self.gguf
            self._llama = BACKENDS.create("llamacpp", **opts)
        if self._exported_for != version:  # the adapter changes once per optimiser step
            from qprobe.rm.gguf_adapter import export_gguf_lora

            folder = self.workdir if self.workdir is not None else Path.cwd()
            path = export_gguf_lora(self.trunk, Path(folder) / "adapter.gguf", base_gguf=self.gguf)
            self._llama.set_lora(path)
            self._exported_for = version
        return self._llama

    def _check_gguf(self) -> None:
        """Refuse a GGUF other than the trunk's weights: the adapter would be applied to another model."""
        from qprobe.generation.models import default_model_path, file_sha256

        path = Path(self.gguf) if self.gguf else Path(default_model_path())
        have = self.trunk.lm.sha256
        if path.is_file() and have and not have.startswith("hub:") and file_sha256(path) != have:
            raise ConfigError(f"expected --gguf to be the trunk's own weights (sha256 {have[:12]}), got '{path}' "
                              "with other weights; pass the GGUF the trunk was loaded from (--model)")

    def sample(self, prompts: Sequence[Prompt], sampling: SamplingConfig, seeds: Sequence[int],
               version: int = 0) -> list[Rollout]:
        """One completion per (prompt, seed) from the current adapters (`version`: the optimiser step
        they come from, so llama.cpp re-exports only when they changed)."""
        backend = self._backend(version)
        texts = [self.render(p) if backend is self.hf else backend.render(p) for p in prompts]
        asks = [GenRequest(i, t, sampling, (int(s),)) for i, (t, s) in enumerate(zip(texts, seeds, strict=True))]
        got: dict[int, Completion] = {}
        for req, comps in generate_many(backend, asks):
            got[int(req.key)] = comps[0]  # type: ignore[call-overload]
        return [self.rollout(p, t, got[i]) for i, (p, t) in enumerate(zip(prompts, texts, strict=True))]

    def rollout(self, prompt: Prompt, text: str, completion: Completion) -> Rollout:
        ids = completion_ids(self.tokenizer, completion)
        ended = completion.finish_reason == "stop"
        actions = ids + [self.end_id] if ended else ids
        if not actions:  # cut at length with nothing kept: cannot happen with max_new_tokens >= 1
            actions, ended = [self.end_id], True
        return Rollout(prompt, text, completion, tuple(encode_prompt(self.tokenizer, text)), tuple(actions), ended)

    # ------------------------------------------------------------------------------ log pi
    def logprobs(self, rollout: Rollout) -> Any:
        """log pi(a_t | x, a_<t) of the rollout's actions [t], differentiable in the adapters."""
        ids = list(rollout.prompt_ids) + list(rollout.action_ids)
        h = self.trunk.bottom_states(ids)  # [T, d], no gradient
        final = self.trunk.top_states(h)  # [T, d]
        return self.trunk.logprobs(final, ids, len(rollout.prompt_ids))  # [t]

    @contextlib.contextmanager
    def base(self) -> Iterator[None]:
        """The frozen base model (adapters off): what the reward models read."""
        with self.trunk.reference():
            yield

    @contextlib.contextmanager
    def adapted(self) -> Iterator[None]:
        """The adapters on again inside `base()` (sampling while the features stay the base model's)."""
        lora = self.trunk.peft.base_model  # peft's LoraModel
        lora.enable_adapter_layers()
        try:
            yield
        finally:
            lora.disable_adapter_layers()

    def collect_backend(self) -> Any:
        """A transformers back-end for `qprobe.collection.collect` that samples this policy (adapters
        on) and embeds with the base model: run the collection inside `base()`."""
        from qprobe.generation.hf import TransformersBackend

        policy = self

        class _Adapted(TransformersBackend):
            def generate(self, text: str, sampling: SamplingConfig, seeds: list[int]) -> list[Completion]:
                with policy.adapted():
                    return super().generate(text, sampling, seeds)

            def close(self) -> None:  # the trunk's model stays loaded
                pass

        return _Adapted(lm=self.trunk.lm)

    def close(self) -> None:
        if self._llama is not None:
            self._llama.close()
            self._llama = None
