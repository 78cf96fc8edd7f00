"""The back-end interface: k sampled completions per prompt.

A back-end is the only place that generates text. `qprobe.generation.fake` is the
reference implementation; the real ones (llamacpp, transformers, openai, vllm) follow it.
Embeddings of prompt+completion are computed by an `Embedder` (`qprobe.features`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qprobe.core.config import config_from_dict, config_to_dict
from qprobe.core.types import Completion, Prompt
from qprobe.errors import ConfigError

if TYPE_CHECKING:
    from qprobe.generation.pool import Pool


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled. `seed` is the run seed; each sample derives its own."""

    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature (0: greedy)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling: keep the top tokens of this total probability."})
    max_new_tokens: int = field(default=300, metadata={"help": "Most tokens per completion."})
    stop: tuple[str, ...] = field(default=(), metadata={"help": "Stop sequence (repeatable). Default: the task's."})
    seed: int = field(default=0, metadata={"help": "Run seed; each sample's seed derives from it."})

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"expected temperature >= 0, got {self.temperature}; use 0 for greedy")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"expected 0 < top_p <= 1, got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"expected max_new_tokens >= 1, got {self.max_new_tokens}")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingConfig:
        return config_from_dict(cls, data)


def sample_seed(run_seed: int, prompt_id: str, index: int) -> int:
    """A per-sample seed that depends only on (run seed, prompt, index): resumes reproduce."""
    import hashlib

    h = hashlib.sha256(f"{run_seed}\x00{prompt_id}\x00{index}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


class Backend(ABC):
    """Samples completions and embeds prompt+completion pairs."""

    name: str = ""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """Model identity for manifests and feature specs: at least `model` and `sha256`."""

    def render(self, prompt: Prompt) -> str:
        """The exact string the model continues (chat template applied where relevant)."""
        return prompt.text

    @abstractmethod
    def generate(self, text: str, sampling: SamplingConfig, seeds: list[int]) -> list[Completion]:
        """len(seeds) completions of the rendered prompt `text`, one per seed."""

    def pool(self) -> Pool:
        """Requests in flight across prompts (`qprobe.generation.pool`); one at a time by default."""
        from qprobe.generation.pool import SequentialPool

        return SequentialPool(self)

    def close(self) -> None:  # noqa: B027 (a no-op by default, on purpose)
        """Release the model."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
