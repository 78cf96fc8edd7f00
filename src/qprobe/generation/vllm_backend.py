"""The vLLM back-end (CUDA GPU): k samples per prompt from vLLM; features by transformers on the same weights.

`VLLMBackend(model, dtype="bfloat16", gpu_memory_utilization=0.8, max_model_len=4096, chat=True,
**llm_options)`; `pip install 'qprobe[vllm]'` pins vLLM 0.33.0, which brings its own CUDA torch
(install it in a GPU environment, never next to the CPU torch pin). Written against vLLM 0.33.0's
source (`vllm/entrypoints/llm.py`, `sampling_params.py`, `outputs.py`, `v1/engine/detokenizer.py`)
and not yet run on a GPU (its SamplingParams and OutputProcessor ran on CPU from the unpacked wheel,
tests/test_vllm_backend.py `-m gpu`): benchmarks/gpu_check.sh is the prepared check, and
benchmarks/RESULTS.md says what ran.

Weights (`weights_for`): `model` is a transformers folder, a hub id, a `.gguf` file, or "default" /
a known name (`qwen2.5-coder-1.5b`) for the packaged GGUFs. vLLM 0.33 reads no GGUF (it moved to a
plugin in 0.24), so a GGUF is dequantised once by transformers into `$QPROBE_CACHE/hf/<sha256>-<dtype>/`
(`qprobe.generation.hf_load`, the same folder the transformers back-end and embedder use) and vLLM
loads that folder: the samples and the features come from the same weight files, and the weights
hash is the GGUF's sha256, as with the llama.cpp back-end.

Prompts: the rendered string (the tokenizer's chat template for chat prompts, as the transformers
back-end renders it) is tokenised here with `encode_prompt`, exactly as the embedder tokenises it,
and sent as `{"prompt_token_ids": ids}`, so vLLM never re-tokenises (no doubled BOS).

Sampling (`sampling_kwargs`): one request per sample, `SamplingParams(n=1, seed=<sample seed>)`, all
k (and, through `pool()`, up to `max_requests` prompts') in one `LLM.generate` call, which vLLM batches.
vLLM's own `n=k` with one seed is k child requests seeded seed+i (`v1/engine/parallel_sampling.py`)
and is refused at temperature 0, so one request per sample costs nothing more and keeps a sample a
function of its own seed. A seeded request draws from its own random stream (a torch.Generator
per request in the V1 model runner, a hash of seed and position in V2), but its logits can still
round differently in another batch: the same command gives the same texts up to such flips
(`VLLM_BATCH_INVARIANT=1` makes them bitwise, on compute capability >= 9.0). Every field is
passed, so the model's generation_config sampling defaults do not apply (vLLM merges only its
end-of-sequence ids): temperature, top_p, top_k 0 (off), min_p 0, no penalties, the stop strings,
and as extra stop tokens the end-of-turn markers the transformers back-end stops on (`END_TOKENS`).

Outputs (`to_completion`): `CompletionOutput.text` excludes the stop string and, after an
end-of-sequence or stop token, that token (special tokens are skipped); `token_ids` still hold the
tokens through the one that completed the stop string, and the end token. The kept ids are the
shortest prefix that decodes to exactly the text (None when the stop string began inside a token:
the embedder then re-tokenises the text), and the end token is dropped, as the other back-ends do.

Features: vLLM 0.33 returns no hidden states of a generating model (CompletionOutput has none; its
`extract_hidden_states` speculative method writes them through a KV connector, for drafter training).
The registry maps the embedder "vllm" to `TransformersEmbedder(backend)`, which loads `model_path` /
`gguf_file` (the same files) with transformers on the GPU next to vLLM (vLLM takes
`gpu_memory_utilization` of the GPU's memory; leave room for the transformers copy) and runs one
batched pass per prompt. The feature specs name the back-end "transformers": that is what computed
them, from the weights whose hash the run's model records.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qprobe.core.types import Completion, Prompt
from qprobe.errors import BackendError, ConfigError, require
from qprobe.generation.base import Backend, BatchedPool, Pool, SamplingConfig

FINISH = ("stop", "length")  # vLLM's other finish reasons (abort, error, repetition) are failures


@dataclass(frozen=True)
class Weights:
    """What the user named and what vLLM and transformers load for it."""

    name: str  # as recorded: the GGUF path, the folder, or the hub id
    kind: str  # "gguf", "folder" or "hub"
    model_path: str  # the embedder's `model`: the GGUF's folder, the folder, or the hub id
    gguf_file: str | None  # the GGUF's file name (the embedder's `gguf_file`)
    sha256: str  # the GGUF's sha256, the folder's weights hash, or "" for a hub id


def weights_for(model: str) -> Weights:
    """Classify `model` and hash local weights (no loading): a `.gguf` file, "default" or a known
    GGUF name, a transformers folder (with config.json), else a hub id."""
    from qprobe.generation.hf_load import folder_sha256
    from qprobe.generation.models import ALIASES, MODELS, file_sha256, resolve_model

    if not model:
        raise ConfigError(
            "expected a model for vllm, got ''; pass --model with a transformers folder, a hub id, "
            "a .gguf file or 'default' (the packaged GGUF)"
        )
    p = Path(model).expanduser()
    if model.lower() in ALIASES or model.lower() in MODELS or p.suffix.lower() == ".gguf":
        gguf = resolve_model(model)
        return Weights(str(gguf), "gguf", str(gguf.parent), gguf.name, file_sha256(gguf, write_sidecar=False))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(f"expected a transformers folder with config.json, got '{p}'; pass the model's folder")
        return Weights(str(p), "folder", str(p), None, folder_sha256(p))
    if p.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ConfigError(
            f"expected a transformers folder, a hub id (ORG/NAME) or a .gguf file, got '{model}'"
        )
    return Weights(model, "hub", model, None, "")


def hf_folder(weights: Weights, dtype: str) -> str:
    """The transformers folder (or hub id) vLLM loads: for a GGUF, its dequantised copy in the
    qprobe cache, made once (the folder `load_causal_lm` makes and reads for the same file)."""
    if weights.kind != "gguf":
        return weights.model_path
    from qprobe.generation import hf_load

    folder = hf_load._gguf_cache_dir(weights.sha256, dtype)
    if not (folder / "config.json").exists():
        hf_load._convert_gguf(weights.model_path, str(weights.gguf_file), dtype, folder)
    return str(folder)


def backend_identity(
    weights: Weights, dtype: str, chat: bool, vllm_version: str, commit: str | None = None
) -> dict[str, Any]:
    """The back-end's identity for manifests: `model` and `sha256` as `load_causal_lm` (the embedder)
    names the same weights, so the run's model and its feature specs agree."""
    sha = f"hub:{weights.name}@{commit or 'unknown'}" if weights.kind == "hub" else weights.sha256
    ident: dict[str, Any] = {"model": weights.name, "sha256": sha, "dtype": dtype, "chat": bool(chat),
                             "vllm": vllm_version}
    if weights.kind != "hub":
        ident["path"] = weights.name  # what `qprobe embed` loads again
    return ident


def plan_requests(
    prompt_ids: Sequence[list[int]], seeds: Sequence[Sequence[int]], sampling: SamplingConfig,
    stop_token_ids: Sequence[int] = (),
) -> tuple[list[dict[str, list[int]]], list[dict[str, Any]]]:
    """The prompts and SamplingParams kwargs of one `LLM.generate` call: one request per sample,
    prompt by prompt, each prompt as token ids (vLLM's TokensPrompt)."""
    prompts: list[dict[str, list[int]]] = []
    params: list[dict[str, Any]] = []
    for ids, ss in zip(prompt_ids, seeds, strict=True):
        for s in ss:
            prompts.append({"prompt_token_ids": list(ids)})
            params.append(sampling_kwargs(sampling, s, stop_token_ids))
    return prompts, params


def sampling_kwargs(sampling: SamplingConfig, seed: int, stop_token_ids: Sequence[int] = ()) -> dict[str, Any]:
    """The keyword arguments of one sample's `vllm.SamplingParams` (see the module docstring)."""
    greedy = sampling.temperature == 0
    return {
        "n": 1,
        "seed": int(seed),
        "temperature": float(sampling.temperature),
        "top_p": 1.0 if greedy else float(sampling.top_p),  # what vLLM sets for greedy anyway
        "top_k": 0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "max_tokens": int(sampling.max_new_tokens),
        "stop": [s for s in sampling.stop if s],  # vLLM refuses an empty stop string
        "stop_token_ids": sorted({int(t) for t in stop_token_ids}),
        "include_stop_str_in_output": False,
        "skip_special_tokens": True,
    }


def sampler_record(sampling: SamplingConfig, stop_token_ids: Sequence[int] = ()) -> dict[str, Any]:
    """The sampler stored in the run's manifest: every field `sampling_kwargs` sets but the seed."""
    kw = {k: v for k, v in sampling_kwargs(sampling, 0, stop_token_ids).items() if k not in ("n", "seed")}
    chain = "greedy" if sampling.temperature == 0 else "temperature, top_p, seeded draw (vLLM SamplingParams)"
    return {"server": None, "chain": chain, **kw}


def kept_prefix(ids: Sequence[int], text: str, decode: Callable[[list[int]], str]) -> list[int] | None:
    """The shortest prefix of `ids` that decodes to exactly `text`, or None."""
    for n in range(len(ids) + 1):
        got = decode(list(ids[:n]))
        if got == text:
            return list(ids[:n])
        if len(got) > len(text) and not got.endswith("\ufffd"):
            return None
    return None


def to_completion(
    text: str,
    token_ids: Sequence[int],
    finish_reason: str | None,
    stop_reason: int | str | None,
    seed: int,
    decode: Callable[[list[int]], str],
    encode: Callable[[str], list[int]],
) -> Completion:
    """Our Completion from one vLLM `CompletionOutput`'s fields (see the module docstring).
    `decode` is the tokenizer's decode with special tokens skipped (as vLLM detokenises), `encode`
    its encode without special tokens (for the count when the ids cannot be kept)."""
    if finish_reason not in FINISH:
        raise BackendError(
            f"expected vLLM to finish sample (seed {seed}) with 'stop' or 'length', got '{finish_reason}' "
            f"(stop_reason {stop_reason!r}); see vLLM's log above"
        )
    ids: list[int] | None = list(token_ids)
    if isinstance(stop_reason, str):  # a stop string: ids run through the token that completed it
        ids = kept_prefix(ids or [], text, decode)
    elif finish_reason == "stop" and ids:  # an end-of-sequence or stop token, excluded from the text
        ids = ids[:-1]
    n_tokens = len(ids) if ids is not None else len(encode(text))
    return Completion(text, n_tokens, str(finish_reason), int(seed), None if ids is None else tuple(ids))


def end_token_ids(tokenizer: Any) -> list[int]:
    """The special end-of-turn / end-of-text tokens the transformers back-end stops on (`END_TOKENS`)."""
    from qprobe.generation.hf import END_TOKENS

    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids)
    ids = {vocab[t] for t in END_TOKENS if t in vocab and vocab[t] in special}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


class VLLMBackend(Backend):
    """vLLM on a CUDA GPU (see the module docstring)."""

    name = "vllm"

    def __init__(
        self,
        model: str = "",
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.8,
        max_model_len: int | None = 4096,
        chat: bool = True,
        seed: int = 0,
        max_requests: int = 64,
        **llm_options: Any,
    ) -> None:
        from qprobe.generation.hf_load import DTYPES

        if max_requests < 1:
            raise ConfigError(f"expected max_requests >= 1 prompts per vLLM call, got {max_requests}")
        self.max_requests = int(max_requests)
        if not model:
            weights_for(model)  # the one-line error naming what to pass
        if dtype not in DTYPES:
            raise ConfigError(f"expected dtype in {list(DTYPES)}, got '{dtype}'")
        if not 0 < float(gpu_memory_utilization) <= 1:
            raise ConfigError(f"expected 0 < gpu_memory_utilization <= 1, got {gpu_memory_utilization}")
        vllm = require("vllm", "vllm")
        torch = require("torch", "vllm")
        if not torch.cuda.is_available():
            raise BackendError("expected a CUDA GPU for the vllm back-end, got none; use llamacpp or transformers")
        tf = require("transformers", "vllm")
        # what a bad request raises: vLLM's own validation errors are not ValueErrors
        self._request_errors = (ValueError, require("vllm.exceptions", "vllm").VLLMClientError)
        self.weights = weights_for(model)
        self.model_path, self.gguf_file = self.weights.model_path, self.weights.gguf_file  # for the embedder
        self.hf_dtype = dtype
        self.chat = bool(chat)
        load_from = hf_folder(self.weights, dtype)
        try:
            self.tokenizer = tf.AutoTokenizer.from_pretrained(load_from)
            # a hub model's commit, read as the embedder reads it (transformers' config): the weights hash
            self._commit = (getattr(tf.AutoConfig.from_pretrained(load_from), "_commit_hash", None)
                            if self.weights.kind == "hub" else None)
            self.stop_token_ids = end_token_ids(self.tokenizer)
            self._vllm = vllm
            self.llm: Any = vllm.LLM(
                model=load_from, dtype=dtype, seed=int(seed), gpu_memory_utilization=float(gpu_memory_utilization),
                max_model_len=max_model_len, **llm_options,
            )  # fmt: skip
        except (OSError, *self._request_errors) as exc:  # a missing hub id or folder, bad engine options
            raise BackendError(f"expected vLLM to load '{model}' (from {load_from}), got: {exc}") from exc

    def identity(self) -> dict[str, Any]:
        return backend_identity(self.weights, self.hf_dtype, self.chat, str(getattr(self._vllm, "__version__", "?")),
                                self._commit)

    def render(self, prompt: Prompt) -> str:
        """The chat template with a generation prompt when the prompt has messages, else its text."""
        if self.chat and prompt.messages and getattr(self.tokenizer, "chat_template", None):
            return str(
                self.tokenizer.apply_chat_template(
                    [dict(m) for m in prompt.messages], tokenize=False, add_generation_prompt=True
                )
            )
        return prompt.text

    def sampler(self, sampling: SamplingConfig) -> dict[str, Any]:
        """The sampling configuration applied (stored in the run's manifest)."""
        return sampler_record(sampling, self.stop_token_ids)

    def generate(self, text: str, sampling: SamplingConfig, seeds: list[int]) -> list[Completion]:
        return self.generate_batch([text], sampling, [seeds])[0]

    def pool(self) -> Pool:
        """Many prompts per `LLM.generate` call (`max_requests` backend option), vLLM batching them."""
        return BatchedPool(self, self.max_requests)

    def generate_batch(
        self, texts: list[str], sampling: SamplingConfig, seeds: list[list[int]]
    ) -> list[list[Completion]]:
        """Several prompts' samples in one `LLM.generate` call (vLLM schedules them together)."""
        from qprobe.generation.hf_load import encode_prompt

        ids = [encode_prompt(self.tokenizer, t) for t in texts]
        prompts, kwargs = plan_requests(ids, seeds, sampling, self.stop_token_ids)
        if not prompts:
            return [[] for _ in texts]
        try:
            params = [self._vllm.SamplingParams(**kw) for kw in kwargs]
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        except self._request_errors as exc:  # e.g. prompt + max_tokens > max_model_len
            raise BackendError(f"expected vLLM to accept the requests, got: {exc}; lower --max-new-tokens "
                               "or raise --backend-option max_model_len=N") from exc
        flat = [s for ss in seeds for s in ss]
        if len(outputs) != len(flat):
            raise BackendError(f"expected {len(flat)} vLLM outputs, got {len(outputs)}")
        comps = [self._completion(req, s) for req, s in zip(outputs, flat, strict=True)]
        result: list[list[Completion]] = []
        for ss in seeds:
            result.append(comps[: len(ss)])
            comps = comps[len(ss) :]
        return result

    def _completion(self, request: Any, seed: int) -> Completion:
        if len(request.outputs) != 1:
            raise BackendError(f"expected one output per vLLM request (n=1), got {len(request.outputs)}")
        o = request.outputs[0]
        tok = self.tokenizer
        return to_completion(
            o.text, o.token_ids, o.finish_reason, o.stop_reason, seed,
            decode=lambda ids: tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False),
            encode=lambda t: tok(t, add_special_tokens=False)["input_ids"],
        )  # fmt: skip

    def close(self) -> None:
        self.llm = None
