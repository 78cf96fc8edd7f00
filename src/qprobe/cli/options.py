"""Shared CLI option parsing."""

from __future__ import annotations

import json
from typing import Any

from qprobe.errors import ConfigError


def parse_kv(pairs: tuple[str, ...], flag: str) -> dict[str, Any]:
    """('size=20', 'data=x.jsonl') -> {'size': 20, 'data': 'x.jsonl'}; values parsed as JSON when they can be."""
    out: dict[str, Any] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected {flag} KEY=VALUE, got '{item}'; e.g. {flag} size=20")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
