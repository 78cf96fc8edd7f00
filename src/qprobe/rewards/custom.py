"""A user's own reward: `module:function(prompt, completion) -> float | None`."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

from qprobe.core.types import Prompt, RewardResult
from qprobe.errors import ConfigError
from qprobe.rewards.base import Reward


def load_callable(target: str) -> Callable[..., Any]:
    """'package.module:function' -> the function (the module is imported from sys.path)."""
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"expected a reward as 'module:function', got '{target}'")
    try:
        fn = importlib.import_module(module)
        for part in attr.split("."):
            fn = getattr(fn, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"expected an importable 'module:function', got '{target}' ({exc}); "
                          "check the name and that its folder is on PYTHONPATH") from exc
    if not callable(fn):
        raise ConfigError(f"expected '{target}' to be callable, got {type(fn).__name__}")
    return fn  # type: ignore[return-value]


class CallableReward(Reward):
    """Calls `fn(prompt, completion)` for each completion; `prompt` is the Prompt (its `meta` holds
    the row's extra fields). A float is the reward; None means 'could not score'. Runs in this
    process: it is the user's own trusted code, not model-written code."""

    def __init__(self, target: str | Callable[..., Any]) -> None:
        self.target = target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"
        self.fn = load_callable(target) if isinstance(target, str) else target

    def score(self, prompt: Prompt, completions: list[str]) -> list[RewardResult]:
        out = []
        for c in completions:
            try:
                value = self.fn(prompt, c)
            except Exception as exc:  # noqa: BLE001  the user's bug: record it, do not stop a long run
                out.append(RewardResult(None, {"status": "error", "error_type": type(exc).__name__,
                                               "message": str(exc)[:500]}))
                continue
            if value is None:
                out.append(RewardResult(None, {"status": "error", "error_type": "Unscored"}))
                continue
            try:
                r = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"expected {self.target} to return a float or None, got {value!r}") from None
            if math.isnan(r):
                out.append(RewardResult(None, {"status": "error", "error_type": "NaN"}))
            else:
                out.append(RewardResult(r, {"status": "scored"}))
        return out

    def manifest(self) -> dict[str, Any]:
        return {"reward": "callable", "target": self.target}
