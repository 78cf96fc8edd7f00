"""Few-shot prompts from successes: the paper's "5-shot on successes" baseline (section 6.1).

`FewShotTask(inner, shots)` puts `shots` (solved examples: a prompt and a completion that earned
reward 1) in front of every prompt of `inner`: earlier user/assistant turns in the chat form,
plain text before the prompt in the completion form. Rewards, stop sequences and splits are the
inner task's; only the context changes, so the reward still sees the completion alone (plus the
inner prompt's own `reward_prefix`).

The examples themselves are drawn from a collected run where collection happens
(`qprobe.collection.fewshot.shots_from_run`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from qprobe.core.types import Prompt
from qprobe.errors import ConfigError
from qprobe.rewards.base import Reward
from qprobe.tasks.base import Task

# Between examples in the completion (non-chat) form.
SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Shot:
    """One solved example: the problem's prompt and a completion that passed."""

    prompt: Prompt
    completion: str
    source: dict[str, Any]  # where it came from: {"run", "prompt_id", "sample_index"}


def with_shots(prompt: Prompt, shots: list[Shot]) -> Prompt:
    """`prompt` with `shots` in front: earlier turns (chat form) and leading text (completion form)."""
    text = "".join(s.prompt.text + s.completion + SEPARATOR for s in shots) + prompt.text
    messages = None
    if prompt.messages is not None:
        turns: list[dict[str, str]] = []
        for s in shots:
            user = list(s.prompt.messages) if s.prompt.messages else [{"role": "user", "content": s.prompt.text}]
            turns += [m for m in user if m.get("role") != "system"]
            turns.append({"role": "assistant", "content": s.completion})
        system = [m for m in prompt.messages if m.get("role") == "system"]
        rest = [m for m in prompt.messages if m.get("role") != "system"]
        messages = tuple(system + turns + rest)
    return replace(prompt, text=text, messages=messages)


class FewShotTask(Task):
    """`inner` with the same solved examples in front of every prompt."""

    def __init__(self, inner: Task, shots: list[Shot]) -> None:
        if not shots:
            raise ConfigError("expected at least one few-shot example, got none; pass --shots K with K >= 1")
        self.inner, self.shots = inner, list(shots)
        self.name, self.splits, self.stop = inner.name, inner.splits, inner.stop

    def prompts(self, split: str) -> list[Prompt]:
        return [with_shots(p, self.shots) for p in self.inner.prompts(split)]

    def reward(self) -> Reward:
        return self.inner.reward()

    def manifest(self) -> dict[str, Any]:
        return {**self.inner.manifest(), "shots": [s.source for s in self.shots]}
