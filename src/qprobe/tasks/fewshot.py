"""Few-shot prompts from successes: the paper's "5-shot on successes" baseline (section 6.1).

`FewShotTask(inner, shots)` puts `shots` (solved examples: a prompt and a completion that earned
reward 1) in front of every prompt of `inner`: earlier user/assistant turns in the chat form,
plain text before the prompt in the completion form. Rewards, stop sequences and splits are the
inner task's; only the context changes, so the reward still sees the completion alone (plus the
inner prompt's own `reward_prefix`).

The examples themselves are drawn from a collected run where collection happens
(`qprobe.collection.fewshot.shots_from_run`).

A prompt never sees its own problem among its examples (a run of the same split could hold
it): `FewShotTask` gives each prompt the first k examples that are not its own problem, and
the draw adds one spare example (`"spare": true` in the manifest) when one is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from qprobe.core.types import Prompt
from qprobe.errors import ConfigError, DataError
from qprobe.rewards.base import Reward
from qprobe.tasks.base import Task

# Between examples in the completion (non-chat) form.
SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Shot:
    """One solved example: the problem's prompt and a completion that passed."""

    prompt: Prompt
    completion: str
    source: dict[str, Any]  # where it came from: {"run", "prompt_id", "sample_index"} (+ "spare")
    task: str = field(default="", compare=False)  # the source run's task name

    def is_problem_of(self, prompt: Prompt, task: str) -> bool:
        """Whether this example is `prompt`'s own problem (its solution must not be in its context)."""
        return self.prompt.text == prompt.text or (self.task == task and self.prompt.id == prompt.id)


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
        self.k = sum(1 for s in self.shots if not s.source.get("spare"))
        self.name, self.splits, self.stop = inner.name, inner.splits, inner.stop

    def shots_for(self, prompt: Prompt) -> list[Shot]:
        """The first k examples that are not `prompt`'s own problem."""
        return [s for s in self.shots if not s.is_problem_of(prompt, self.inner.name)][: self.k]

    def prompts(self, split: str) -> list[Prompt]:
        out = []
        for p in self.inner.prompts(split):
            shots = self.shots_for(p)
            if len(shots) < self.k:
                raise DataError(f"expected {self.k} examples of other problems for prompt {p.id}, got {len(shots)}; "
                                "start a new run (older runs drew no spare example)")
            out.append(with_shots(p, shots))
        return out

    def reward(self) -> Reward:
        return self.inner.reward()

    def manifest(self) -> dict[str, Any]:
        return {**self.inner.manifest(), "shots": [s.source for s in self.shots]}
