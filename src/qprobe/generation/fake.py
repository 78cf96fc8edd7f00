"""The fake back-end: deterministic completions and features from a seed, no model.

It is the reference for writing a back-end: `generate` returns one `Completion` per seed,
`identity` names the "weights".
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from qprobe.core.types import Completion
from qprobe.generation.base import Backend, SamplingConfig
from qprobe.tasks.fake import FAKE_DIM


class FakeBackend(Backend):
    """Completions are `return <n>` programs (features: `qprobe.features.fake`).

    `delay` seconds are slept per sample (generation) to emulate a real model's pace.
    """

    name = "fake"

    def __init__(self, model: str = "fake", dim: int = FAKE_DIM, delay: float = 0.0) -> None:
        self.model = model or "fake"
        self.dim = int(dim)
        self.delay = float(delay)

    def identity(self) -> dict[str, Any]:
        return {"model": self.model, "sha256": f"fake-{self.dim}", "dim": self.dim}

    def sampler(self, sampling: SamplingConfig) -> dict[str, Any]:
        """What the sampler applies (collect stores it in the manifest): a seeded draw, nothing else."""
        return {"server": None, "chain": "greedy" if sampling.temperature == 0 else "seeded uniform draw",
                "stop": list(sampling.stop), "max_tokens": sampling.max_new_tokens}

    def generate(self, text: str, sampling: SamplingConfig, seeds: list[int]) -> list[Completion]:
        out = []
        for seed in seeds:
            if self.delay:
                time.sleep(self.delay)
            rng = np.random.default_rng(seed)
            if sampling.temperature == 0:
                rng = np.random.default_rng(0)
            body = "    return " + " + ".join(str(v) for v in rng.integers(0, 100, size=rng.integers(1, 6)))
            n_tokens = len(body.split())
            finish = "stop"
            if n_tokens > sampling.max_new_tokens:
                body = " ".join(body.split()[: sampling.max_new_tokens])
                n_tokens, finish = sampling.max_new_tokens, "length"
            out.append(Completion(text=body, n_tokens=n_tokens, finish_reason=finish, seed=seed))
        return out
