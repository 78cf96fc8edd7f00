"""What a task is: prompts in named splits, stop sequences and a reward."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from qprobe.errors import ConfigError


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
class RewardResult:
    """A scored completion: `reward` is None when it could not be scored."""

    reward: float | None
    details: dict[str, Any] = field(default_factory=dict)


class Reward(ABC):
    """Scores the completions of one prompt."""

    #: Whether scoring runs model-written code (then it needs the user's opt-in).
    executes_code: bool = False

    @abstractmethod
    def score(self, prompt: Prompt, completions: list[str]) -> list[RewardResult]:
        """One result per completion, in order."""

    def manifest(self) -> dict[str, Any]:
        """What to record in a run's manifest about how rewards were computed."""
        return {"reward": type(self).__name__}


class Task(ABC):
    """A named set of prompts, split by name, with stop sequences and a reward."""

    name: str = ""
    splits: tuple[str, ...] = ()
    #: Stop sequences for completion-style prompts (chat prompts stop at end of turn).
    stop: tuple[str, ...] = ()

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ConfigError(
                f"task '{self.name}' has splits {list(self.splits)}, got '{split}'; pass one of them with --split"
            )

    @abstractmethod
    def prompts(self, split: str) -> list[Prompt]:
        """The prompts of `split`, in a fixed order."""

    @abstractmethod
    def reward(self) -> Reward:
        """The reward used for this task's completions."""

    def manifest(self) -> dict[str, Any]:
        """Task settings recorded in the run manifest (prompt template, data source, ...)."""
        return {"task": self.name}
