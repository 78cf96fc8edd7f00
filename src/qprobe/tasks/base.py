"""What a task is: prompts in named splits, stop sequences and a reward."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from qprobe.core.types import Prompt
from qprobe.errors import ConfigError
from qprobe.rewards.base import Reward


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
