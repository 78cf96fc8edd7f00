"""What a reward is: it scores the completions of one prompt."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from qprobe.core.types import Prompt, RewardResult


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
