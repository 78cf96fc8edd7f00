"""The rewards REINFORCE can optimise: raw per-action values Z [t_i] of each rollout.

  oracle  the task's own reward (unit tests through the sandbox for code), terminal
  orm     a last-token probe's score (the ORM baseline: `TokenProbe(aggregation="last")` or any probe
          on last-pooled states), terminal
  qprobe  a Q-probe's value (any probe, its own pooling), terminal
  qrm     a mean-trained token probe's score of every action token's state (Q-RM), end token included

Probe rewards read the frozen base model's states (adapters off, `Policy.base`), as a reward model
trained on base-model samples would: the token states of prompt + actions at the probe's layer,
computed by the transformers embedder on the trunk's own weights. The probe must have been trained
on these weights (its feature spec's sha256) and on base-model samples of the training split only:
`check_probe` refuses a probe whose training prompts include any evaluation prompt.
Tokens: the ORM reads the last kept token's state, as qprobe trains it (Q-RM's code reads the EOS
token's; probes/token.py); Q-RM scores every action token, the end token included as in the
authors' code, with a head trained on the mean of the kept tokens' states (whose EOS score the EOS
rule then replaces by the sequence mean anyway; it still enters std(Z)).
`sequence_value` is the one number a rollout's reward is reported as (the hacking report, the log).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from qprobe.errors import ConfigError, SpecMismatchError
from qprobe.features.spec import FeatureRequest
from qprobe.learn.policy import Policy, Rollout
from qprobe.learn.reinforce import terminal_values


def oracle_rewards(task_reward: Any, rollouts: list[Rollout]) -> list[float | None]:
    """The task's verdict of each rollout (None: it could not be scored), grouped by prompt."""
    by_prompt: dict[str, list[int]] = {}
    for i, r in enumerate(rollouts):
        by_prompt.setdefault(r.prompt.id, []).append(i)
    out: list[float | None] = [None] * len(rollouts)
    for rows in by_prompt.values():
        prompt = rollouts[rows[0]].prompt
        results = task_reward.score(prompt, [rollouts[i].completion.text for i in rows])
        for i, res in zip(rows, results, strict=True):
            out[i] = None if res.reward is None else float(res.reward)
    return out


class StepReward(ABC):
    """Raw values Z of a chunk of rollouts (see the module docstring)."""

    name = ""
    terminal = True

    @abstractmethod
    def values(self, policy: Policy, rollouts: list[Rollout],
               verdicts: list[float | None] | None = None) -> list[np.ndarray]:
        """Z [n_actions] per rollout (`verdicts`: the oracle's, when the caller has them already)."""

    def sequence_value(self, z: np.ndarray) -> float:
        return float(z[-1]) if self.terminal else float(np.mean(z))

    def manifest(self) -> dict[str, Any]:
        return {"reward": self.name}


class OracleReward(StepReward):
    name = "oracle"

    def __init__(self, task_reward: Any, probe: Any = None) -> None:
        if probe is not None:
            raise ConfigError("expected no probe for --reward oracle (the task's own reward), got one; drop --probe")
        self.task_reward = task_reward
        if getattr(task_reward, "executes_code", False):
            from qprobe import sandbox

            sandbox.require_opt_in()

    def values(self, policy: Policy, rollouts: list[Rollout],
               verdicts: list[float | None] | None = None) -> list[np.ndarray]:
        got = oracle_rewards(self.task_reward, rollouts) if verdicts is None else verdicts
        vals = [0.0 if g is None else g for g in got]  # unscored (a sandbox error) counts as a fail
        return terminal_values(vals, [r.n_actions for r in rollouts])

    def manifest(self) -> dict[str, Any]:
        return {"reward": self.name, "task_reward": self.task_reward.manifest()}


class _ProbeReward(StepReward):
    """A probe read on the base model's states; `pooling` is the request it scores."""

    def __init__(self, task_reward: Any, probe: Any = None) -> None:
        if probe is None:
            raise ConfigError(f"expected a trained probe for --reward {self.name}, got none; pass --probe DIR "
                              "(trained on base-model samples of the training split)")
        spec = getattr(probe, "feature_spec_", None)
        if spec is None or spec.embedder:
            raise SpecMismatchError(f"expected a probe on a hidden-state layer of the policy's base model for "
                                    f"--reward {self.name}, got {'none' if spec is None else spec.describe()}")
        self.probe, self.spec = probe, spec
        self.check(probe)
        self._embedder: Any = None

    def check(self, probe: Any) -> None:  # noqa: B027 (no extra condition by default)
        """Refuse a probe this reward cannot use."""

    def embedder(self, policy: Policy) -> Any:
        if self._embedder is None:
            from qprobe.features import make_embedder

            want, have = self.spec.sha256, policy.trunk.lm.sha256
            if want and have and want != have:
                raise SpecMismatchError(f"expected a probe trained on the policy's base weights (sha256 "
                                        f"{have[:12]}), got one on {want[:12]} ({self.spec.describe()})")
            self._embedder = make_embedder(policy.hf, "")
        return self._embedder

    def manifest(self) -> dict[str, Any]:
        return {"reward": self.name, "probe": self.spec.describe(), "probe_loss": str(getattr(self.probe, "loss", ""))}


class ProbeValueReward(_ProbeReward):
    """Terminal: the probe's score of the completion's pooled base-model state (its own pooling)."""

    name = "qprobe"

    def values(self, policy: Policy, rollouts: list[Rollout],
               verdicts: list[float | None] | None = None) -> list[np.ndarray]:
        emb = self.embedder(policy)
        req = FeatureRequest(self.spec.layer, self.spec.pooling)
        vals = []
        with policy.base():
            for r in rollouts:
                feats = np.asarray(emb.embed(r.text, [r.completion], [req])[req.key])  # [1, d]
                vals.append(float(np.asarray(self.probe.score(feats))[0]))
        return terminal_values(vals, [r.n_actions for r in rollouts])


class LastTokenReward(ProbeValueReward):
    """ORM: the score of the last kept token's state (the probe's training feature, `L*_last`)."""

    name = "orm"

    def check(self, probe: Any) -> None:
        if self.spec.pooling != "last":
            raise SpecMismatchError(f"expected an ORM probe on last-token states (e.g. `qprobe train --arch token "
                                    f"--loss bt` on L18_last) for --reward orm, got {self.spec.describe()}")


class TokenReward(_ProbeReward):
    """Q-RM: Z_t = v . h_t + b of every action token's base-model state (end token included)."""

    name = "qrm"
    terminal = False

    def check(self, probe: Any) -> None:
        if not hasattr(probe, "score_tokens") or getattr(probe, "aggregation", None) != "mean":
            raise ConfigError(f"expected a Q-RM token probe (`qprobe train --arch token` on mean-pooled states) for "
                              f"--reward qrm, got a {type(probe).__name__} on {self.spec.describe()}")

    def values(self, policy: Policy, rollouts: list[Rollout],
               verdicts: list[float | None] | None = None) -> list[np.ndarray]:
        emb = self.embedder(policy)
        layer = self.spec.layer
        out = []
        with policy.base():
            for r in rollouts:
                states = emb.token_states(list(r.prompt_ids), [list(r.action_ids)], [layer])[layer][0]  # [t, d]
                out.append(np.asarray(self.probe.score_tokens(states), dtype=np.float64))  # [t]
        return out
