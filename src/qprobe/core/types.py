"""The data types that cross layers: a prompt, a sampled completion, a scored completion."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Prompt:
    """One problem. `text` is a completion-style prompt; `messages` (optional) the chat form.

    The back-end decides which form it renders (`Backend.render`) and the rendered string is
    what gets stored, generated from and embedded. `meta` carries what the reward needs
    (tests, entry point, reference answer) and must be JSON-serialisable.
    """

    id: str
    text: str
    messages: tuple[dict[str, str], ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    # Text the back-end must prepend to a completion before it is rewarded (e.g. the
    # function signature of a HumanEval prompt when the model continues its body).
    reward_prefix: str = ""


@dataclass(frozen=True)
class Completion:
    """One sample: `text` is exactly what the reward and the embedding see (stop removed)."""

    text: str
    n_tokens: int
    finish_reason: str  # "stop" (EOS or a stop sequence) or "length"
    seed: int
    # Token ids of the completion when the back-end has them (lets features reuse them).
    token_ids: tuple[int, ...] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class RewardResult:
    """A scored completion: `reward` is None when it could not be scored."""

    reward: float | None
    details: dict[str, Any] = field(default_factory=dict)
