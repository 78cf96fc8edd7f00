"""Request bodies of OpenAI's chat and completions endpoints, validated into a `PolicyRequest`.

The policy's own parameters travel in one extension object, `"qprobe": {"k", "beta",
"return_candidates"}` (the openai client sends it with `extra_body={"qprobe": {...}}`); OpenAI's
sampling fields (temperature, top_p, max_tokens, stop, seed, n) keep their meaning, applied to each
of the k samples. Fields the policy cannot honour (logprobs, tools, ...) are refused by name unless
they ask for nothing (null, false, 0, empty), and so are fields OpenAI does not define: a typo
never passes silently. Every refusal is a `RequestError`: a 4xx in OpenAI's error shape.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass
from typing import Any

from qprobe.core.types import Prompt
from qprobe.errors import ConfigError
from qprobe.generation.base import SamplingConfig


class RequestError(ConfigError):
    """A request the server refuses: HTTP `status`, OpenAI's error `type`, `param` and `code`."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code


# Fields both endpoints honour; the chat endpoint adds messages / max_completion_tokens, completions prompt.
_COMMON = {"model", "temperature", "top_p", "max_tokens", "stop", "seed", "n", "stream", "stream_options", "qprobe",
           "user", "store", "metadata", "service_tier"}  # the last four change nothing in the answer
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = _COMMON | {"prompt"}
# OpenAI fields a pick among k samples cannot honour; accepted when they ask for nothing.
UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call",
               "parallel_tool_calls", "response_format", "logit_bias", "frequency_penalty", "presence_penalty",
               "echo", "best_of", "suffix", "audio", "modalities", "prediction", "reasoning_effort",
               "web_search_options")
_OFF: dict[str, tuple[Any, ...]] = {"response_format": ({"type": "text"},), "tool_choice": ("none",), "best_of": (1,)}
QPROBE_FIELDS = ("k", "beta", "return_candidates")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_PROMPTS = 16  # prompts in one /v1/completions request


@dataclass(frozen=True)
class ServeDefaults:
    """What a request gets for the fields it leaves out (the probe's card: `defaults_from_probe`), and
    `max_samples`, the most samples (n x k) one request may ask for."""

    k: int = 8
    beta: float = 0.0
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 300
    stop: tuple[str, ...] = ()
    max_samples: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.max_samples:
            raise ConfigError(f"expected 1 <= k <= max_samples ({self.max_samples}), got k = {self.k}")
        if not (self.beta >= 0 and math.isfinite(self.beta)):
            raise ConfigError(f"expected beta >= 0, got {self.beta}; beta = 0 means argmax")
        SamplingConfig(self.temperature, self.top_p, self.max_tokens, self.stop)  # raises ConfigError


def defaults_from_probe(probe: Any, **overrides: Any) -> ServeDefaults:
    """k and beta of the probe's training config (what its validation measured), the stop sequences of
    the task it was trained on (its completions ended there), then `overrides` (None: keep)."""
    train = getattr(probe, "train", None)
    task = (getattr(probe, "source_", None) or {}).get("task") or {}
    found: dict[str, Any] = {}
    if train is not None:
        found.update(k=int(train.k), beta=float(train.beta))
    if isinstance(task.get("stop"), list) and all(isinstance(s, str) for s in task["stop"]):
        found["stop"] = tuple(task["stop"])
    found.update({name: value for name, value in overrides.items() if value is not None})
    return ServeDefaults(**found)


@dataclass(frozen=True)
class PolicyRequest:
    """One request: each prompt gets `n` picks, each among its own `k` samples drawn with `sampling`
    (whose `seed` is the request's seed, drawn at random when the request has none)."""

    prompts: tuple[Prompt, ...]
    n: int
    k: int
    beta: float
    sampling: SamplingConfig
    return_candidates: bool = False
    stream: bool = False
    include_usage: bool = False


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object (NaN and Infinity refused, as JSON has none)."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=refuse)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(f"expected a JSON object as the request body, got invalid JSON ({exc}); "
                           "send Content-Type: application/json with a JSON body") from None
    if not isinstance(body, dict):
        raise RequestError(f"expected a JSON object as the request body, got {_kind(body)}")
    return body


def parse_chat_body(body: dict[str, Any], defaults: ServeDefaults) -> PolicyRequest:
    """A /v1/chat/completions body: `messages` become one chat prompt (the back-end renders it)."""
    _check_fields(body, CHAT_FIELDS, "/v1/chat/completions")
    if "messages" not in body:
        raise RequestError("expected a 'messages' list in the body, got none; e.g. "
                           '"messages": [{"role": "user", "content": "..."}]', param="messages")
    messages = _messages(body["messages"])
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise RequestError("expected one of 'max_tokens' or 'max_completion_tokens', got both", param="max_tokens")
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    # Back-ends without a chat template continue the messages' text, one after the other.
    prompt = Prompt(id="chat", text="\n\n".join(m["content"] for m in messages), messages=messages)
    return _request(body, defaults, (prompt,), name)


def parse_completion_body(body: dict[str, Any], defaults: ServeDefaults) -> PolicyRequest:
    """A /v1/completions body: `prompt`, a string or a list of strings, is continued as plain text."""
    _check_fields(body, COMPLETION_FIELDS, "/v1/completions")
    value = body.get("prompt")
    texts = [value] if isinstance(value, str) else value
    if not (isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)):
        hint = "; send the text, not token ids" if isinstance(texts, list) and texts and not isinstance(texts[0], str) else ""
        raise RequestError(f"expected 'prompt' as a string or a non-empty list of strings, got {_kind(value)}{hint}",
                           param="prompt")
    if len(texts) > MAX_PROMPTS:
        raise RequestError(f"expected at most {MAX_PROMPTS} prompts in one request, got {len(texts)}; "
                           "send several requests", param="prompt")
    return _request(body, defaults, tuple(Prompt(id=f"prompt-{i}", text=t) for i, t in enumerate(texts)), "max_tokens")


def _request(body: dict[str, Any], defaults: ServeDefaults, prompts: tuple[Prompt, ...], max_name: str) -> PolicyRequest:
    ext = body.get("qprobe", {})
    if not isinstance(ext, dict):
        raise RequestError(f"expected 'qprobe' as an object with {list(QPROBE_FIELDS)}, got {_kind(ext)}", param="qprobe")
    unknown = sorted(set(ext) - set(QPROBE_FIELDS))
    if unknown:
        raise RequestError(f"expected fields of 'qprobe' among {list(QPROBE_FIELDS)}, got {unknown}", param="qprobe")
    k = _int(ext, "k", defaults.k, 1, "qprobe.k")
    n = _int(body, "n", 1, 1, "n")
    if n * k > defaults.max_samples:
        raise RequestError(f"expected at most {defaults.max_samples} samples per prompt (n x k), got n = {n} x k = {k} "
                           f"= {n * k}; lower n or qprobe.k (or start the server with a larger --max-samples)", param="n")
    beta = _number(ext, "beta", defaults.beta, 0.0, None, "qprobe.beta")
    temperature = _number(body, "temperature", defaults.temperature, 0.0, 2.0, "temperature")
    top_p = _number(body, "top_p", defaults.top_p, 0.0, 1.0, "top_p")
    if top_p == 0:
        raise RequestError("expected 0 < top_p <= 1, got 0; use temperature 0 for greedy samples", param="top_p")
    max_tokens = _int(body, max_name, defaults.max_tokens, 1, max_name)
    seed = _int(body, "seed", None, None, "seed")
    stream = _bool(body, "stream", False, "stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {"include_usage"}):
        raise RequestError(f"expected 'stream_options' as {{\"include_usage\": true|false}}, got {json.dumps(options)[:80]}",
                           param="stream_options")
    include_usage = _bool(options or {}, "include_usage", False, "stream_options.include_usage")
    if include_usage and not stream:
        raise RequestError("expected 'stream_options' only with \"stream\": true, got it without", param="stream_options")
    if not isinstance(body.get("model", ""), str):
        raise RequestError(f"expected 'model' as a string, got {_kind(body['model'])}", param="model")
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_tokens,
                              stop=_stop(body.get("stop"), defaults.stop),
                              seed=secrets.randbelow(2**31) if seed is None else seed)
    return PolicyRequest(prompts, n, k, beta, sampling, _bool(ext, "return_candidates", False, "qprobe.return_candidates"),
                         stream, include_usage)


def _check_fields(body: dict[str, Any], allowed: set[str], endpoint: str) -> None:
    unsupported = [f for f in UNSUPPORTED if f in body and body[f] not in (None, False, 0, "", [], {}, *_OFF.get(f, ()))]
    if unsupported:
        raise RequestError(f"expected no {', '.join(repr(f) for f in unsupported)}: the answer is the Q-probe policy's "
                           "pick among k plain samples, which has no token log-probabilities, tools, response formats "
                           "or penalties; drop these fields", param=unsupported[0], code="unsupported_parameter")
    unknown = sorted(set(body) - allowed - set(UNSUPPORTED))
    if unknown:
        hint = " (the policy's own k and beta go in the 'qprobe' object)" if set(unknown) & set(QPROBE_FIELDS) else ""
        raise RequestError(f"expected fields of {endpoint} among {sorted(allowed)}, got unrecognized "
                           f"{', '.join(repr(f) for f in unknown)}{hint}", param=unknown[0], code="unknown_parameter")


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if not (isinstance(value, list) and value):
        raise RequestError(f"expected 'messages' as a non-empty list of {{role, content}} objects, got {_kind(value)}",
                           param="messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"expected {where} as a {{role, content}} object, got {_kind(m)}", param=where)
        role = m.get("role")
        if role not in ROLES:
            why = " (tool calls are not supported)" if role in ("tool", "function") else ""
            raise RequestError(f"expected {where}.role among {sorted(ROLES)}, got {json.dumps(role)}{why}", param=f"{where}.role")
        extra = sorted(set(m) - {"role", "content", "name"} - ({"tool_calls"} if not m.get("tool_calls") else set()))
        if extra:
            raise RequestError(f"expected {where} to have role, content and name only, got {extra}", param=f"{where}.{extra[0]}")
        out.append({"role": ROLES[role], "content": _content(m.get("content"), where)})
    return tuple(out)


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        kinds = sorted({str(p.get("type")) for p in value} - {"text"})
        if kinds:
            raise RequestError(f"expected {where}.content parts of type 'text', got {kinds}; this model reads text only",
                               param=f"{where}.content")
        if all(isinstance(p.get("text"), str) for p in value):
            return "".join(p["text"] for p in value)
    raise RequestError(f"expected {where}.content as a string or a list of {{\"type\": \"text\", \"text\": ...}} parts, "
                       f"got {_kind(value)}", param=f"{where}.content")


def _stop(value: Any, default: tuple[str, ...]) -> tuple[str, ...]:
    if value is None:
        return default
    stops = [value] if isinstance(value, str) else value
    if not (isinstance(stops, list) and len(stops) <= 16 and all(isinstance(s, str) and s for s in stops)):
        raise RequestError(f"expected 'stop' as a non-empty string or a list of at most 16 of them, got {_kind(value)}",
                           param="stop")
    return tuple(stops)


def _int(obj: dict[str, Any], name: str, default: Any, lo: int | None, param: str) -> Any:
    value = obj.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or (lo is not None and value < lo):
        bound = f" >= {lo}" if lo is not None else ""
        raise RequestError(f"expected '{param}' as an integer{bound}, got {_show(value)}", param=param)
    return value


def _number(obj: dict[str, Any], name: str, default: float, lo: float, hi: float | None, param: str) -> float:
    value = obj.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        bound = f"in [{lo:g}, {hi:g}]" if hi is not None else f">= {lo:g}"
        raise RequestError(f"expected '{param}' as a number {bound}, got {_show(value)}", param=param)
    return float(value)


def _bool(obj: dict[str, Any], name: str, default: bool, param: str) -> bool:
    value = obj.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"expected '{param}' as true or false, got {_show(value)}", param=param)
    return value


def _show(value: Any) -> str:
    return json.dumps(value)[:60] if isinstance(value, (int, float, bool)) else _kind(value)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {json.dumps(value[:40])}"
    return "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else type(value).__name__
