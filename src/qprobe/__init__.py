"""qprobe: Q-probing (Li et al., 2024) — best-of-k selection with a linear probe on a frozen model.

Layers, lowest first. A module imports only from its own layer or a lower one, with no import
cycle; lazy imports inside functions count, and so does a look-up in one of `qprobe.catalog`'s
registries (it imports that registry's targets). tests/test_layers.py reads this list and checks it.

  1. core        qprobe.errors, qprobe.core, qprobe.registry, qprobe.catalog, qprobe.metrics, qprobe.intervals
                 (the data types Prompt, Completion, RewardResult; the atomic file writer; config
                 dataclasses to and from JSON; registries of components by import path; maths on arrays)
  2. rewards     qprobe.rewards, qprobe.sandbox, qprobe._sandbox_* (judge text)
  3. tasks       qprobe.tasks (prompts paired with a reward)
  4. generation  qprobe.generation (back-ends that sample completions)
  5. features    qprobe.features (hidden states and embedders)
  6. store       qprobe.store (runs on disk, nothing else)
  7. collection  qprobe.collection (the pipeline that writes runs)
  8. probes      qprobe.probes, qprobe.rm (probes, their losses, training and files; reward models
                 with a trainable trunk: LoRA adapters + an EX / IM / Q-RM head)
  9. policy      qprobe.policy (best-of-k selection with a probe)
 10. evaluation  qprobe.evaluation (expected returns, tables, judges, reports)
 11. learning    qprobe.learn (training loops that change the policy: REINFORCE with probe or oracle
                 rewards, iterative Q-probing)
 12. serving     qprobe.serve (the Q-probe policy behind an OpenAI-compatible HTTP API)
 13. cli         qprobe.cli

The names below are imported lazily: `import qprobe` stays light (no torch, no llama.cpp).
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
    "UnknownNameError": "qprobe.errors", "MissingDependencyError": "qprobe.errors",
    "UnconfinedSandbox": "qprobe.errors", "SandboxError": "qprobe.errors",
    # components
    "Prompt": "qprobe.core.types", "Completion": "qprobe.core.types", "RewardResult": "qprobe.core.types",
    "Reward": "qprobe.rewards.base", "Task": "qprobe.tasks.base",
    "Backend": "qprobe.generation.base",
    "SamplingConfig": "qprobe.generation.base",
    "GenRequest": "qprobe.generation.base",
    "Pool": "qprobe.generation.base",
    "SequentialPool": "qprobe.generation.base",
    "BatchedPool": "qprobe.generation.base",
    "generate_many": "qprobe.generation.base",
    "Embedder": "qprobe.features", "FeatureRequest": "qprobe.features", "FeatureSpec": "qprobe.features",
    "make_embedder": "qprobe.features",
    "TASKS": "qprobe.catalog", "BACKENDS": "qprobe.catalog", "REWARDS": "qprobe.catalog", "LOSSES": "qprobe.catalog",
    # store
    "Run": "qprobe.store", "RunWriter": "qprobe.store", "CollectConfig": "qprobe.collection.collect", "collect": "qprobe.collection.collect",
    # probes
    "Probe": "qprobe.probes", "LinearProbe": "qprobe.probes", "MLPProbe": "qprobe.probes", "TokenProbe": "qprobe.probes",
    "TrainConfig": "qprobe.probes",
    "RewardModel": "qprobe.rm", "RMConfig": "qprobe.rm", "load_rm": "qprobe.rm", "save_rm": "qprobe.rm",
    # policy and evaluation
    "QProbePolicy": "qprobe.policy.select", "PolicyConfig": "qprobe.policy.select",
    "Selection": "qprobe.policy.select", "Candidate": "qprobe.policy.select",
    "RLConfig": "qprobe.learn.rl", "RLSetup": "qprobe.learn.rl", "run_rl": "qprobe.learn.rl",
    "IterConfig": "qprobe.learn.iterate", "run_iterate": "qprobe.learn.iterate",
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
