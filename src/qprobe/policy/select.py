"""The Q-probe policy (section 4): sample k, embed, score, pick by softmax(Q/beta).

`QProbePolicy` is what users call. The probe's feature spec decides how candidates are
embedded; an embedder producing other features is refused (SpecMismatchError).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from qprobe.core.types import Prompt
from qprobe.errors import ConfigError
from qprobe.features import make_embedder
from qprobe.features.spec import FeatureRequest, FeatureSpec
from qprobe.generation.base import SamplingConfig, sample_seed
from qprobe.metrics import selection_probs
from qprobe.policy.agreement import consensus_scores


@dataclass
class Candidate:
    text: str
    score: float
    prob: float
    n_tokens: int
    finish_reason: str


@dataclass
class Selection:
    prompt_id: str
    text: str
    index: int
    candidates: list[Candidate] = field(default_factory=list)
    draws: int = 0  # samples drawn (rejection mode may draw more than k)
    fallback: bool = False  # rejection: nothing was accepted within max_rounds (see QProbePolicy._rejection)
    above_bound: int = 0  # rejection: candidates whose Q exceeded the bound M (accepted with probability 1)

    def to_dict(self, with_candidates: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_candidates:
            d.pop("candidates")
        return d


@dataclass(frozen=True)
class PolicyConfig:
    """k candidates, temperature beta; mode 'softmax' (4.1) or 'rejection' (4.2); `consensus`: the
    weight of the candidates' agreement added to Q (policy/agreement.py; softmax mode only)."""

    k: int = 8
    beta: float = 0.0
    mode: str = "softmax"
    q_max: float | None = None  # rejection: the bound M on Q (default: the probe's largest training score)
    max_rounds: int = 8  # rejection: batches of k drawn before the fallback (see QProbePolicy._rejection)
    consensus: float = 0.0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"expected k >= 1 candidates, got {self.k}")
        if self.beta < 0:
            raise ConfigError(f"expected beta >= 0, got {self.beta}; beta = 0 means argmax")
        if self.mode not in ("softmax", "rejection"):
            raise ConfigError(f"expected mode 'softmax' or 'rejection', got '{self.mode}'")
        if self.mode == "rejection" and self.beta == 0:
            raise ConfigError("expected beta > 0 for rejection sampling (accept with exp((Q - M) / beta)); use mode softmax for argmax")
        if self.max_rounds < 1:
            raise ConfigError(f"expected max_rounds >= 1, got {self.max_rounds}")
        if self.q_max is not None and not np.isfinite(self.q_max):
            raise ConfigError(f"expected a finite bound q_max, got {self.q_max}")
        if not (self.consensus >= 0 and np.isfinite(self.consensus)):
            raise ConfigError(f"expected a consensus weight >= 0, got {self.consensus}")
        if self.consensus and self.mode == "rejection":
            raise ConfigError("expected mode softmax with a consensus weight (agreement needs the whole set of k), "
                              "got mode rejection; drop one of them")


class QProbePolicy:
    """Best-of-k selection with a trained probe over a frozen model.

    `probe` needs `score(features [k, d]) -> [k]` and a `feature_spec_` (FeatureSpec).
    """

    def __init__(self, backend: Any, probe: Any, config: PolicyConfig | None = None,
                 sampling: SamplingConfig | None = None, rng: np.random.Generator | None = None) -> None:
        self.backend = backend
        self.probe = probe
        self.config = config or PolicyConfig()
        self.sampling = sampling or SamplingConfig()
        self.rng = rng if rng is not None else np.random.default_rng(0)
        spec: FeatureSpec = probe.feature_spec_
        self.request = FeatureRequest(layer=spec.layer, pooling=spec.pooling, embedder=spec.embedder)
        self.embedder = make_embedder(backend, spec.embedder)
        self._spec = spec
        self._checked = False
        self._calls = 0
        self.bound: float | None = None
        if self.config.mode == "rejection":
            self.bound = self.config.q_max
            if self.bound is None:
                self.bound = (getattr(probe, "history_", None) or {}).get("q_max")
            if self.bound is None:
                raise ConfigError(
                    "expected a bound M on Q for rejection sampling (accept with exp((Q - M) / beta)), got none: "
                    "the probe records no training scores (trained before qprobe stored them); pass --q-max M "
                    "(PolicyConfig(q_max=M)) or retrain the probe"
                )
            self.bound = float(self.bound)

    def _scores(self, text: str, completions: list[Any]) -> np.ndarray:
        feats = np.asarray(self.embedder.embed(text, completions, [self.request])[self.request.key])  # [k, d]
        if not self._checked:
            self._spec.check_compatible(self.embedder.spec(self.request, int(feats.shape[-1]), self._spec.dtype))
            self._checked = True
        return np.asarray(self.probe.score(feats), dtype=np.float64)  # [k]

    def _draw(self, prompt: Prompt, text: str, start: int) -> list[Any]:
        seeds = [sample_seed(self.sampling.seed + self._calls, prompt.id, start + j) for j in range(self.config.k)]
        return list(self.backend.generate(text, self.sampling, seeds))

    def __call__(self, prompt: Prompt | str) -> Selection:
        if isinstance(prompt, str):
            prompt = Prompt(id="prompt", text=prompt, messages=({"role": "user", "content": prompt},))
        self._calls += 1
        text = self.backend.render(prompt)
        if self.config.mode == "rejection":
            return self._rejection(prompt, text)
        comps = self._draw(prompt, text, 0)
        q = consensus_scores(self._scores(text, comps), [c.text for c in comps], self.config.consensus)  # [k]
        p = selection_probs(q, self.config.beta)
        i = int(self.rng.choice(len(p), p=p))
        return Selection(prompt.id, comps[i].text, i, _candidates(comps, q, p), draws=len(comps))

    def _rejection(self, prompt: Prompt, text: str) -> Selection:
        """Sec. 4.2: draw a ~ p0 and accept it with probability exp((Q(a) - M) / beta), so that accepted
        samples follow p0(a) exp(Q(a)/beta) / Z exactly, for a fixed bound M >= every Q.

        M is `PolicyConfig.q_max`, else the largest score of the probe on its training rows. A
        candidate with Q > M is accepted with probability 1 (counted in `Selection.above_bound`): the
        target is then p0 x min(exp(Q/beta), exp(M/beta)), i.e. Q is capped at M. After `max_rounds`
        batches of k without an acceptance (probability (1 - Z)^(k max_rounds), Z = E_p0[exp((Q-M)/beta)])
        the fallback picks one of the rejected candidates with self-normalised importance weights
        a/(1 - a), a = exp((Q - M)/beta): the rejected candidates follow p0(1 - a), and these
        weights turn that into p0 a, the target, as the pool grows. It is an approximation (the pool
        cannot hold a candidate that is always accepted); `Selection.fallback` says when it was used.
        """
        assert self.bound is not None  # set in __init__ for mode rejection
        beta, bound = self.config.beta, self.bound
        seen: list[Any] = []
        scores: list[float] = []
        above = 0
        for r in range(self.config.max_rounds):
            comps = self._draw(prompt, text, r * self.config.k)
            q = self._scores(text, comps)  # [k]
            for c, qi in zip(comps, q, strict=False):
                seen.append(c)
                scores.append(float(qi))
                above += int(qi > bound)
                if self.rng.random() < np.exp(min(0.0, (qi - bound) / beta)):  # Sec. 4.2, accept w.p. exp((Q - M)/beta)
                    i = len(seen) - 1
                    p = np.zeros(len(seen))
                    p[i] = 1.0
                    return Selection(prompt.id, c.text, i, _candidates(seen, np.array(scores), p), draws=len(seen),
                                     above_bound=above)
        q_all = np.array(scores)  # [draws], every one < M (a candidate with Q >= M is always accepted)
        log_a = (q_all - bound) / beta
        log_w = log_a - np.log(-np.expm1(log_a))  # log(a / (1 - a))
        p = np.exp(log_w - log_w.max())
        p /= p.sum()
        i = int(self.rng.choice(len(p), p=p))
        return Selection(prompt.id, seen[i].text, i, _candidates(seen, q_all, p), draws=len(seen), fallback=True,
                         above_bound=above)


def _candidates(comps: list[Any], q: np.ndarray, p: np.ndarray) -> list[Candidate]:
    return [Candidate(c.text, float(s), float(pi), c.n_tokens, c.finish_reason) for c, s, pi in zip(comps, q, p, strict=False)]
