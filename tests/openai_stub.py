"""Pieces of the stub OpenAI-compatible servers the tests run on 127.0.0.1 (http.server handlers)."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from typing import Any


def send_json(handler: BaseHTTPRequestHandler, status: int, obj: dict[str, Any]) -> None:
    data = json.dumps(obj).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def completion(path: str, model: str, text: str, finish_reason: str = "stop", usage: dict | None = None) -> dict[str, Any]:
    """A one-choice reply of /v1/chat/completions (a message) or /v1/completions (a text)."""
    if path.endswith("/chat/completions"):
        kind, choice = "chat.completion", {"index": 0, "message": {"role": "assistant", "content": text}}
    else:
        kind, choice = "text_completion", {"index": 0, "text": text}
    choice["finish_reason"] = finish_reason
    out = {"id": "x", "object": kind, "created": 0, "model": model, "choices": [choice]}
    return {**out, "usage": usage} if usage else out
