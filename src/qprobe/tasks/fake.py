"""A deterministic fake task whose reward a linear probe can learn from fake features.

Completions and features come from `qprobe.generation.fake`; both hash the same text,
so the reward is a (noisy) linear function of the features the fake back-end returns.
"""

from __future__ import annotations

import hashlib

import numpy as np

from qprobe.core.types import Prompt, RewardResult
from qprobe.rewards.base import Reward
from qprobe.tasks.base import Task

FAKE_DIM = 16


def text_rng(*parts: str) -> np.random.Generator:
    """A generator seeded by the hash of some strings: the same text, the same numbers."""
    h = hashlib.sha256("\x00".join(parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def fake_state(prompt_text: str, completion: str, dim: int = FAKE_DIM) -> np.ndarray:
    """The latent 'hidden state' of a prompt+completion: what fake rewards and features share."""
    return text_rng("state", prompt_text, completion).standard_normal(dim)  # [d]


def fake_reward_value(prompt: Prompt, completion: str, dim: int = FAKE_DIM) -> float:
    """1.0 when a fixed linear function of the state, plus a per-prompt difficulty, is positive."""
    w = np.random.default_rng(1234).standard_normal(dim)  # [d]
    difficulty = text_rng("difficulty", prompt.id).normal(0.0, 1.0)
    noise = text_rng("noise", prompt.text, completion).normal(0.0, 0.5)
    return float(fake_state(prompt.text, completion, dim) @ w / np.sqrt(dim) + difficulty + noise > 0)


class FakeReward(Reward):
    def __init__(self, dim: int = FAKE_DIM) -> None:
        self.dim = dim

    def score(self, prompt: Prompt, completions: list[str]) -> list[RewardResult]:
        out = []
        for c in completions:
            r = fake_reward_value(prompt, c, self.dim)
            out.append(RewardResult(r, {"status": "passed" if r else "failed"}))
        return out

    def manifest(self) -> dict[str, object]:
        return {"reward": "fake", "dim": self.dim}


class FakeTask(Task):
    """`size` prompts per split ('train', 'test'); rewards learnable from fake features."""

    name = "fake"
    splits = ("train", "test")
    stop = ("\n\n",)

    def __init__(self, size: int = 20, dim: int = FAKE_DIM) -> None:
        self.size = int(size)
        self.dim = int(dim)

    def prompts(self, split: str) -> list[Prompt]:
        self.check_split(split)
        return [
            Prompt(id=f"{split}/{i}", text=f"# fake {split} problem {i}\ndef f():\n", meta={"i": i})
            for i in range(self.size)
        ]

    def reward(self) -> Reward:
        return FakeReward(self.dim)

    def manifest(self) -> dict[str, object]:
        return {"task": self.name, "size": self.size, "dim": self.dim}
