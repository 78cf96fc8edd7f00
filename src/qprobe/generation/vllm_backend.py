"""The vLLM back-end (GPU): k samples per prompt; features by a second transformers pass.

Written against vLLM 0.33.0 (`pip install 'qprobe[vllm]'`, which pins it; vLLM brings its own
CUDA torch, so install it in a GPU environment, not next to the CPU torch pin):
`LLM(model=..., tokenizer=..., dtype=..., seed=..., gpu_memory_utilization=..., max_model_len=...)`,
`SamplingParams(n, temperature, top_p, max_tokens, stop, seed)`, `LLM.generate(prompts, params)`
-> `RequestOutput.outputs[i]` with `.text` (stop string excluded), `.token_ids`, `.finish_reason`.

Seeds: by default each sample is its own request (`n=1`, `seed=<sample seed>`), all k submitted
in one `generate` call so vLLM batches them and its prefix cache evaluates the shared prompt
once; a sample then depends only on its seed. `per_sample_seeds=False` sends one request with
`n=k` and `seed=<first sample seed>` instead (vLLM's own n-way sampling; reproducible per
prompt, not per sample).

Features: the registry maps the embedder "vllm" to `TransformersEmbedder(backend)`, which loads
the same weights (`model_path`, `gguf_file`) with transformers and runs one batched pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qprobe.core.types import Completion, Prompt
from qprobe.errors import BackendError, ConfigError, require
from qprobe.generation.base import Backend, SamplingConfig


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(
        self,
        model: str = "",
        tokenizer: str | None = None,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.8,
        max_model_len: int | None = 4096,
        chat: bool = True,
        per_sample_seeds: bool = True,
        seed: int = 0,
        **llm_options: Any,
    ) -> None:
        if not model:
            raise ConfigError(
                "expected a model (hub id, folder or .gguf file) for vllm, got ''; pass --model"
            )
        vllm = require("vllm", "vllm")
        torch = require("torch", "vllm")
        if not torch.cuda.is_available():
            raise BackendError(
                "expected a CUDA GPU for the vllm back-end, got none; use llamacpp or transformers"
            )
        self.model_path = model
        self.gguf_file: str | None = None
        if Path(model).suffix == ".gguf":  # vLLM reads GGUF but wants the tokenizer separately
            self.model_path, self.gguf_file = str(Path(model).parent), Path(model).name
        self.hf_dtype = dtype
        self.chat = bool(chat)
        self.per_sample_seeds = bool(per_sample_seeds)
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=model, tokenizer=tokenizer or (self.model_path if self.gguf_file else None),
            dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len, **llm_options,
        )  # fmt: skip
        self.tokenizer = self.llm.get_tokenizer()
        self._identity: dict[str, Any] | None = None

    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            from qprobe.generation.hf_load import folder_sha256
            from qprobe.generation.models import file_sha256

            p = Path(self.model_path)
            if self.gguf_file:
                sha = file_sha256(p / self.gguf_file, write_sidecar=False)
            else:
                sha = folder_sha256(p) if p.is_dir() else f"hub:{self.model_path}"
            name = str(p / self.gguf_file) if self.gguf_file else self.model_path
            self._identity = {"model": name, "sha256": sha, "dtype": self.hf_dtype}
        return self._identity

    def render(self, prompt: Prompt) -> str:
        if self.chat and prompt.messages and getattr(self.tokenizer, "chat_template", None):
            return str(
                self.tokenizer.apply_chat_template(
                    [dict(m) for m in prompt.messages], tokenize=False, add_generation_prompt=True
                )
            )
        return prompt.text

    def _params(self, sampling: SamplingConfig, n: int, seed: int) -> Any:
        return self._vllm.SamplingParams(
            n=n, temperature=sampling.temperature, top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens, stop=list(sampling.stop) or None, seed=seed,
        )  # fmt: skip

    def sampler(self, sampling: SamplingConfig) -> dict[str, Any]:
        """The sampling configuration applied (stored in the run's manifest): SamplingParams' own
        defaults for everything not set here (top_k off, min_p 0, no penalties)."""
        return {"server": None, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": -1,
                "min_p": 0.0, "repetition_penalty": 1.0, "chain": "vLLM SamplingParams",
                "stop": list(sampling.stop), "max_tokens": sampling.max_new_tokens}

    def generate(self, text: str, sampling: SamplingConfig, seeds: list[int]) -> list[Completion]:
        return self.generate_many([text], sampling, [seeds])[0]

    def generate_many(
        self, texts: list[str], sampling: SamplingConfig, seeds: list[list[int]]
    ) -> list[list[Completion]]:
        """Several prompts in one `LLM.generate` call (vLLM schedules them together)."""
        prompts: list[str] = []
        params: list[Any] = []
        for text, ss in zip(texts, seeds, strict=True):
            if self.per_sample_seeds:
                prompts += [text] * len(ss)
                params += [self._params(sampling, 1, s) for s in ss]
            elif ss:
                prompts.append(text)
                params.append(self._params(sampling, len(ss), ss[0]))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        choices = [o for req in outputs for o in sorted(req.outputs, key=lambda o: o.index)]
        result: list[list[Completion]] = []
        pos = 0
        for ss in seeds:
            group = []
            for s in ss:
                o = choices[pos]
                pos += 1
                ids = tuple(o.token_ids)
                finish = "length" if o.finish_reason == "length" else "stop"
                # with a stop string vLLM's text excludes it but token_ids may not: let the embedder
                # re-tokenise unless the ids decode to the text exactly (it checks)
                group.append(Completion(o.text, len(ids), finish, s, ids))
            result.append(group)
        return result

    def close(self) -> None:
        self.llm = None
