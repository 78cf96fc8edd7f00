"""The OpenAI-compatible back-end: any server speaking /v1/completions and /v1/chat/completions.

`OpenAIBackend(model, base_url=None, api_key_env="OPENAI_API_KEY", chat=True, n_per_request=None,
max_retries=5, timeout=120, serve=None, serve_threads=None, serve_ctx=4096, serve_embedding=True)`.
`base_url` defaults to $OPENAI_BASE_URL, then the OpenAI API; the key is read from the named
environment variable ("EMPTY" when unset: local servers need none).

Served (the API setting offline): `serve="default"` (the packaged GGUF), a known model name or a
GGUF path starts llama-cpp-python's server on 127.0.0.1 and a free port (`server.llama_server`,
`serve_threads`/`serve_ctx` its threads and context; `serve_embedding` its /v1/embeddings, on
for LAYER:POOLING features through the server; chat prompts rendered with the GGUF's own template,
as `LlamaCppBackend.render` renders them), points the client at it (`model`: the alias,
default "local") and stops it in `close()`. The identity then names the served weights (sha256
and path, as the llamacpp back-end's) and no port, so a resumed run matches and
`qprobe embed RUN --backend llamacpp` can check it re-embeds with the same weights.

Rendering: a prompt with `messages` (and `chat=True`) renders to the JSON text
`{"messages": [...]}`, which is what the run stores (exactly what was sent) and what `generate`
recognises and sends to the chat endpoint; any other text goes to the completions endpoint.

Sampling: k samples are asked for with `n` (at most `n_per_request` per request, default k);
several servers ignore `n` (llama-cpp-python's server returns one choice), so further requests
top up until k choices arrived. Each request carries `seed` = the sample seed of the first
sample it fills: reproducible on servers that honour seeds, per request. Transient errors
(429, 5xx, connection, timeout) are retried with exponential backoff; others raise BackendError.
Per-choice token counts come from `usage` when a request returned one choice, else usage is
split over the choices in proportion to their text length (an estimate).

Sampler: servers add samplers of their own unless told not to (llama-cpp-python's server: top_k
40, min_p 0.05, repeat penalty 1.1 by default), which would make an "API" run sample another
distribution than a `llamacpp` run of the same weights. `server=` says which kind of server it is
("auto": a served GGUF is llama_cpp; else the `owned_by` of GET /models: "vllm" is vLLM, anything
else the plain OpenAI API). llama_cpp and vLLM get neutral values of their extra samplers in
`extra_body` (top_k off, min_p 0, repeat penalty 1) and every stop sequence; the plain OpenAI API
takes at most 4 stop sequences, and more are refused (ConfigError), never cut. `sampler(sampling)`
is the full configuration the server applies (what collect stores in the manifest); note that
llama-cpp-python applies top_p BEFORE the temperature (the llamacpp back-end: after), so the two
agree exactly only at top_p = 1 or temperature = 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qprobe.core.types import Completion, Prompt
from qprobe.errors import BackendError, ConfigError, require
from qprobe.generation.base import Backend, SamplingConfig

OPENAI_API = "https://api.openai.com/v1"
SERVER_KINDS = ("auto", "llama_cpp", "vllm", "openai")
MAX_OPENAI_STOPS = 4  # the OpenAI API's limit on stop sequences
# Neutral values of each server's own extra samplers (sent in extra_body), and what it then applies.
NEUTRAL: dict[str, dict[str, Any]] = {
    "llama_cpp": {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0},  # llama_cpp/server/types.py fields
    "vllm": {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0},  # vLLM's SamplingParams names
    "openai": {},
}
APPLIED: dict[str, dict[str, Any]] = {
    "llama_cpp": {"top_k": 0, "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0, "presence_penalty": 0.0,
                  "frequency_penalty": 0.0, "mirostat_mode": 0,
                  "chain": "top_k, typical_p, top_p, min_p, temperature, dist(seed) (llama-cpp-python server)"},
    "vllm": {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
             "chain": "temperature, top_k, top_p, min_p (vLLM)"},
    "openai": {"chain": "temperature, top_p (the server's own; nothing else can be asked)"},
}
# A served GGUF renders chat prompts with its own template (as LlamaCppBackend.render does), never
# with a built-in format llama-cpp-python may guess from it.
SERVE_ARGS = ("--chat_format", "chat_template.default")


def chat_json(messages: Any) -> str:
    """The rendered form of a chat prompt: `{"messages": [...]}` (what is sent and stored)."""
    return json.dumps({"messages": [dict(m) for m in messages]}, ensure_ascii=False)


def parse_chat(text: str) -> list[dict[str, str]] | None:
    """The messages of a text made by `chat_json`, else None (a plain completion prompt)."""
    if not text.startswith('{"messages"'):
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if isinstance(obj, dict) and set(obj) == {"messages"} and isinstance(obj["messages"], list):
        return obj["messages"]
    return None


def plain_text(text: str) -> str:
    """A rendered prompt as plain text for text embedders: chat messages' contents joined by newlines."""
    messages = parse_chat(text)
    if messages is None:
        return text
    return "\n".join(str(m.get("content", "")) for m in messages)


def make_client(base_url: str | None, api_key_env: str, timeout: float) -> Any:
    openai = require("openai", "openai")
    url = base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_API
    key = os.environ.get(api_key_env) or "EMPTY"
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=timeout)


def call_with_retries(
    fn: Callable[[], Any], max_retries: int, sleep: Callable[[float], None] = time.sleep, base: float = 0.5
) -> Any:
    """`fn()` with exponential backoff (base * 2^attempt, jittered, capped at 30 s) on transient errors."""
    openai = require("openai", "openai")
    transient = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError)
    for attempt in range(max_retries + 1):
        try:
            return fn()
        except transient as exc:  # APITimeoutError is an APIConnectionError
            if attempt == max_retries:
                raise BackendError(
                    f"expected an answer from the server, got {type(exc).__name__} after "
                    f"{max_retries + 1} attempts ({exc}); check the server and its base URL"
                ) from exc
            sleep(min(30.0, base * 2**attempt) * (0.5 + random.random()))
        except openai.APIStatusError as exc:
            raise BackendError(
                f"expected a successful answer, got HTTP {exc.status_code} ({exc.message}); "
                "check the model name, the key and the request options"
            ) from exc
    raise AssertionError("unreachable")  # pragma: no cover


class OpenAIBackend(Backend):
    """Samples from an OpenAI-compatible server (see the module docstring)."""

    name = "openai"

    def __init__(
        self,
        model: str = "",
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        chat: bool = True,
        n_per_request: int | None = None,
        max_retries: int = 5,
        timeout: float = 120.0,
        embedding_model: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
        serve: str | None = None,
        serve_threads: int | None = None,
        serve_ctx: int = 4096,
        serve_embedding: bool = True,
        server: str = "auto",
    ) -> None:
        if server not in SERVER_KINDS:
            raise ConfigError(f"expected server in {list(SERVER_KINDS)}, got '{server}'")
        if not model and not serve:
            raise ConfigError(
                "expected a model name for the openai back-end, got ''; pass --model NAME "
                "(or --backend-option serve=default to serve the packaged GGUF locally)"
            )
        if n_per_request is not None and n_per_request < 1:
            raise ConfigError(f"expected n_per_request >= 1, got {n_per_request}")
        if serve and base_url:
            raise ConfigError(
                f"expected serve or base_url, got both (serve={serve}, base_url={base_url}); drop one"
            )
        self._stack = contextlib.ExitStack()
        self.served: Path | None = None  # the GGUF this back-end serves itself, if any
        self._served_sha256: str | None = None
        try:
            if serve:
                from qprobe.generation.models import resolve_model
                from qprobe.generation.server import llama_server

                self.served = resolve_model(str(serve))
                info = self._stack.enter_context(llama_server(
                    self.served, alias=model or "local", n_ctx=int(serve_ctx), n_threads=serve_threads,
                    embedding=bool(serve_embedding), extra_args=SERVE_ARGS,
                ))  # fmt: skip
                model, base_url = info.model, info.base_url
            self.client = make_client(base_url, api_key_env, timeout)
        except BaseException:
            self._stack.close()
            raise
        self.model = model
        self.base_url = str(self.client.base_url).rstrip("/")
        self.chat = bool(chat)
        self.n_per_request = n_per_request
        self.max_retries = int(max_retries)
        self.embedding_model = embedding_model or model
        self._sleep = sleep
        self.requests_sent = 0
        self._server = "llama_cpp" if self.served is not None and server == "auto" else server

    @property
    def server_kind(self) -> str:
        """llama_cpp, vllm or openai (see the module docstring); "auto" asks GET /models once."""
        if self._server == "auto":
            try:
                owners = {str(getattr(m, "owned_by", "")) for m in self.client.models.list().data}
            except Exception:  # a server without /models: treat it as the plain API
                owners = set()
            self._server = "vllm" if "vllm" in owners else "openai"
        return self._server

    def sampler(self, sampling: SamplingConfig) -> dict[str, Any]:
        """The whole sampling configuration the server applies (stored in the run's manifest)."""
        kind = self.server_kind
        self._check_stops(sampling, kind)
        return {"server": kind, "temperature": sampling.temperature, "top_p": sampling.top_p,
                "max_tokens": sampling.max_new_tokens, "stop": list(sampling.stop), **APPLIED[kind],
                "extra_body": dict(NEUTRAL[kind]), "seed": "per request: the first sample's seed"}

    @staticmethod
    def _check_stops(sampling: SamplingConfig, kind: str) -> None:
        if kind == "openai" and len(sampling.stop) > MAX_OPENAI_STOPS:
            raise ConfigError(
                f"expected at most {MAX_OPENAI_STOPS} stop sequences for the OpenAI API, got {len(sampling.stop)} "
                f"({list(sampling.stop)}); pass at most {MAX_OPENAI_STOPS} --stop, or --backend-option server=llama_cpp "
                "(or vllm) if the server is one of those"
            )

    def identity(self) -> dict[str, Any]:
        if self.served is not None:  # the weights are known: hashed as the llamacpp back-end does
            from qprobe.generation.models import file_sha256, model_name

            if self._served_sha256 is None:
                self._served_sha256 = file_sha256(self.served)
            return {"model": model_name(self.served), "sha256": self._served_sha256, "path": str(self.served),
                    "served": "llama_cpp.server", "alias": self.model}  # no port: resumes must match
        # An API exposes no weights: the model name stands in for the hash.
        return {"model": self.model, "sha256": f"api:{self.model}", "base_url": self.base_url}

    def render(self, prompt: Prompt) -> str:
        if self.chat and prompt.messages:
            return chat_json(prompt.messages)
        return prompt.text

    def generate(self, text: str, sampling: SamplingConfig, seeds: list[int]) -> list[Completion]:
        messages = parse_chat(text)
        out: list[Completion] = []
        while len(out) < len(seeds):
            want = len(seeds) - len(out)
            n = min(want, self.n_per_request or want)
            got = self._request(text, messages, sampling, n, seeds[len(out)])
            if not got:
                raise BackendError("expected at least one choice from the server, got none; check the server")
            for c in got[:want]:
                seed = seeds[len(out)]
                out.append(Completion(c.text, c.n_tokens, c.finish_reason, seed, None))
        return out

    def _request(
        self, text: str, messages: list[dict[str, str]] | None, sampling: SamplingConfig, n: int, seed: int
    ) -> list[Completion]:
        kwargs: dict[str, Any] = dict(
            model=self.model, n=n, temperature=sampling.temperature, top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens, seed=seed,
        )  # fmt: skip
        kind = self.server_kind
        self._check_stops(sampling, kind)
        if sampling.stop:
            kwargs["stop"] = list(sampling.stop)
        if NEUTRAL[kind]:
            kwargs["extra_body"] = dict(NEUTRAL[kind])  # switch off the server's own extra samplers
        if messages is not None:
            resp = call_with_retries(
                lambda: self.client.chat.completions.create(messages=messages, **kwargs),
                self.max_retries, self._sleep,
            )  # fmt: skip
            texts = [(ch.message.content or "", ch.finish_reason) for ch in resp.choices]
        else:
            resp = call_with_retries(
                lambda: self.client.completions.create(prompt=text, **kwargs), self.max_retries, self._sleep
            )
            texts = [(ch.text or "", ch.finish_reason) for ch in resp.choices]
        self.requests_sent += 1
        total = getattr(getattr(resp, "usage", None), "completion_tokens", None)
        out = []
        chars = sum(len(t) for t, _ in texts) or 1
        for t, reason in texts:
            cut = _cut(t, sampling.stop)
            finish = "length" if reason == "length" and cut is None else "stop"
            t = t if cut is None else t[:cut]
            if total is None:
                n_tok = 0
            elif len(texts) == 1:
                n_tok = int(total)
            else:
                n_tok = round(int(total) * len(t) / chars)
            out.append(Completion(t, n_tok, finish, seed, None))
        return out

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self._stack.close()  # stops a served llama.cpp server


def _cut(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the first stop string starts (servers usually strip it already), or None."""
    hits = [i for s in stop if s and (i := text.find(s)) >= 0]
    return min(hits) if hits else None
