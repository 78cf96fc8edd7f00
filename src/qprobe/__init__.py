"""qprobe: Q-probing (Li et al., 2024) — best-of-k selection with a linear probe on a frozen model.

The pipeline, one sub-package each: tasks -> generation -> features -> rewards -> store -> probes
-> policy -> evaluation -> cli. Names below are imported lazily: `import qprobe` stays light
(no torch, no llama.cpp).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # errors
    "QProbeError": "qprobe.errors", "ConfigError": "qprobe.errors", "DataError": "qprobe.errors",
    "StoreError": "qprobe.errors", "SpecMismatchError": "qprobe.errors", "NotFittedError": "qprobe.errors",
    "BackendError": "qprobe.errors", "CodeExecutionNotAllowed": "qprobe.errors",
    "UnconfinedSandbox": "qprobe.errors", "SandboxError": "qprobe.errors",
    # components
    "Prompt": "qprobe.tasks.base", "Task": "qprobe.tasks.base", "Reward": "qprobe.tasks.base",
    "RewardResult": "qprobe.tasks.base",
    "Backend": "qprobe.generation.base", "Completion": "qprobe.generation.base",
    "SamplingConfig": "qprobe.generation.base",
    "Embedder": "qprobe.features", "FeatureRequest": "qprobe.features", "FeatureSpec": "qprobe.features",
    "make_embedder": "qprobe.features",
    "TASKS": "qprobe.registry", "BACKENDS": "qprobe.registry", "REWARDS": "qprobe.registry",
    # store
    "Run": "qprobe.store", "RunWriter": "qprobe.store", "CollectConfig": "qprobe.store.collect", "collect": "qprobe.store.collect",
    # probes
    "Probe": "qprobe.probes", "LinearProbe": "qprobe.probes", "MLPProbe": "qprobe.probes",
    "TrainConfig": "qprobe.probes",
    # policy and evaluation
    "QProbePolicy": "qprobe.policy.select", "PolicyConfig": "qprobe.policy.select",
    "pass_at_k": "qprobe.metrics", "expected_return": "qprobe.metrics", "bootstrap_ci": "qprobe.intervals",
    "paired_bootstrap_ci": "qprobe.intervals",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qprobe' has no attribute '{name}'")


def __dir__() -> list[str]:
    return __all__
