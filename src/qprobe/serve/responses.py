"""The answers in OpenAI's shapes: chat.completion, text_completion, their stream chunks, errors.

Beside OpenAI's fields every answer carries a top-level `qprobe` object: k, beta, the seed used
(drawn at random when the request had none: send it back to get the same answer), and per choice
the index of the pick among its k samples with its Q and selection probability; with
`"return_candidates": true` also the k candidates (text, Q, probability, tokens, finish reason).

Usage: `completion_tokens` counts every sampled token, all n x k samples of every prompt (what the
server generated, not only what it returned); `prompt_tokens` counts each prompt once per request,
as OpenAI does for n > 1 (the back-end evaluates it once and shares it among its samples).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from qprobe.serve.engine import Answer, Pick
from qprobe.serve.protocol import PolicyRequest, RequestError


def error_body(error: RequestError) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def usage(answers: list[Answer]) -> dict[str, int]:
    prompt = sum(a.prompt_tokens for a in answers)
    sampled = sum(a.completion_tokens for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": sampled, "total_tokens": prompt + sampled}


def _picks(answers: list[Answer]) -> list[Pick]:
    """The choices in OpenAI's order: prompt by prompt, n picks each."""
    return [p for a in answers for p in a.picks]


def qprobe_info(req: PolicyRequest, answers: list[Answer]) -> dict[str, Any]:
    choices = []
    for i, pick in enumerate(_picks(answers)):
        c = pick.chosen
        info: dict[str, Any] = {"index": i, "pick": pick.index, "q": c.score, "prob": c.prob}
        if req.return_candidates:
            info["candidates"] = [{"index": j, "text": x.text, "q": x.score, "prob": x.prob, "n_tokens": x.n_tokens,
                                   "finish_reason": x.finish_reason} for j, x in enumerate(pick.candidates)]
        choices.append(info)
    return {"k": req.k, "beta": req.beta, "seed": req.sampling.seed, "samples": req.n * req.k * len(req.prompts),
            "choices": choices}


def chat_body(rid: str, created: int, model: str, req: PolicyRequest, answers: list[Answer]) -> dict[str, Any]:
    choices = [{"index": i, "message": {"role": "assistant", "content": p.chosen.text},
                "finish_reason": p.chosen.finish_reason, "logprobs": None} for i, p in enumerate(_picks(answers))]
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage(answers), "qprobe": qprobe_info(req, answers)}


def completion_body(rid: str, created: int, model: str, req: PolicyRequest, answers: list[Answer]) -> dict[str, Any]:
    choices = [{"index": i, "text": p.chosen.text, "finish_reason": p.chosen.finish_reason, "logprobs": None}
               for i, p in enumerate(_picks(answers))]
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage(answers), "qprobe": qprobe_info(req, answers)}


def text_pieces(text: str) -> list[str]:
    """The text cut after each word (leading whitespace kept): the pieces join to `text`."""
    return re.findall(r"\s*\S+|\s+", text)


def stream_events(rid: str, created: int, model: str, req: PolicyRequest, answers: list[Answer],
                  chat: bool) -> Iterator[str]:
    """Server-sent events: each choice's text in pieces, its finish reason (with the `qprobe` object on
    the last choice's), the usage when asked (`stream_options.include_usage`), then `[DONE]`."""
    head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model}

    def event(choice: dict[str, Any], **extra: Any) -> str:
        return "data: " + json.dumps({**head, "choices": [choice], **extra}, ensure_ascii=False) + "\n\n"

    picks = _picks(answers)
    for i, pick in enumerate(picks):
        if chat:
            yield event({"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None})
        for piece in text_pieces(pick.chosen.text):
            delta = {"delta": {"content": piece}} if chat else {"text": piece}
            yield event({"index": i, **delta, "finish_reason": None, "logprobs": None})
        last: dict[str, Any] = {"index": i, **({"delta": {}} if chat else {"text": ""}), "finish_reason": pick.chosen.finish_reason,
                "logprobs": None}
        yield event(last, **({"qprobe": qprobe_info(req, answers)} if i == len(picks) - 1 else {}))
    if req.include_usage:
        yield "data: " + json.dumps({**head, "choices": [], "usage": usage(answers)}) + "\n\n"
    yield "data: [DONE]\n\n"
