"""The report's numbers per prompt: each candidate's reward, verdict, Q and selection probability.

Pure data (`CandidateView`, `PromptView`, `Report`) and the function that reads them from a run's
rows (`prompt_views`); `report` computes a `Report`, `report_page` turns it into HTML.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from qprobe.evaluation.credits import CandidateCredits
from qprobe.evaluation.evaluate import MethodResult, RunData
from qprobe.metrics import selection_probs


@dataclass(frozen=True)
class CandidateView:
    """One scored candidate of a prompt, with one entry per probe in `q`, `p` and `credits`."""

    row: int  # row number in the run's storage order
    sample_index: int
    completion: str
    reward: float
    verdict: str  # "passed", or the failing test / error the reward recorded
    q: tuple[float, ...]
    p: tuple[float, ...]  # probability of picking it among the prompt's candidates, softmax(Q/beta)
    credits: tuple[CandidateCredits | None, ...]


@dataclass(frozen=True)
class PromptView:
    """A prompt's candidates, best Q under the first probe first (by sample index without probes)."""

    prompt_id: str
    prompt: str
    candidates: tuple[CandidateView, ...]

    @property
    def best(self) -> float:
        return max(c.reward for c in self.candidates)

    @property
    def mixed(self) -> bool:
        """Whether the candidates' rewards differ (only then can a selection matter)."""
        return min(c.reward for c in self.candidates) < self.best

    def picked(self, probe: int) -> float:
        """The reward of the probe's argmax pick (ties split: their mean reward)."""
        q = np.array([c.q[probe] for c in self.candidates])  # [n]
        r = np.array([c.reward for c in self.candidates])  # [n]
        return float(selection_probs(q, 0.0) @ r)

    def wrong(self, probe: int) -> bool:
        """Whether the probe's argmax pick has a lower reward than the prompt's best candidate."""
        return self.picked(probe) < self.best - 1e-12

    def zmax(self, probe: int) -> float:
        """The credit scale's end for this prompt: the largest |Z_t| among its candidates."""
        zs = [float(np.abs(cred.z).max()) for c in self.candidates if (cred := c.credits[probe]) is not None]
        return max(zs, default=0.0)


@dataclass(frozen=True)
class Report:
    """Everything the page shows; `about` and `notes` are (label, text) and text lines."""

    about: tuple[tuple[str, str], ...]
    probes: tuple[str, ...]
    k: int
    beta: float
    methods: tuple[MethodResult, ...]  # methods[0] is pass@1, the baseline of the gains
    gains: tuple[tuple[float, float, float] | None, ...]  # paired gain over pass@1, None for itself
    ks: tuple[int, ...]
    curves: dict[str, list[float]]
    prompts: tuple[PromptView, ...]
    credit_notes: tuple[str, ...]  # per probe: where its token credits come from, or why there are none
    notes: tuple[str, ...] = ()
    figure: str | None = None  # file name of the figure in the folder, None when not drawn


def verdict(details: str | None, reward: float) -> str:
    """What the reward recorded about a candidate: 'passed', or status, error, failing test, message."""
    try:
        d = json.loads(details) if details else {}
    except json.JSONDecodeError:
        return str(details)[:500]
    if not isinstance(d, dict):
        return str(d)[:500]
    status = str(d.get("status", ""))
    if status == "passed":
        return "passed"
    parts = [status, str(d.get("error_type") or "")]
    if d.get("failing_test"):
        parts.append(f"failing test: {d['failing_test']}")
    if d.get("message"):
        parts.append(str(d["message"]))
    if "expected" in d:
        parts.append(f"answer {d.get('extracted')!r}, expected {d['expected']!r}")
    return " \u00b7 ".join(p for p in parts if p) or f"reward {reward:g}"


def prompt_views(data: RunData, scores: Sequence[np.ndarray], beta: float,
                 credits: Sequence[Mapping[int, CandidateCredits]] = ()) -> list[PromptView]:
    """Per prompt (in the run's order), its scored candidates with Q and selection probability per
    probe; `scores[j]` [N] aligned with `data.rows`, `credits[j]`: row number -> that probe's credits."""
    table = data.run.table(["prompt", "completion", "sample_index", "details"]).to_pydict()
    credits = list(credits) or [{} for _ in scores]
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(data.prompt_ids.tolist()):
        by_prompt.setdefault(p, []).append(i)
    out = []
    for pid, idx in by_prompt.items():
        q = np.array([[float(s[i]) for s in scores] for i in idx]).reshape(len(idx), len(scores))  # [n, probes]
        probs = np.stack([selection_probs(q[:, j], beta) for j in range(len(scores))], axis=1) if len(scores) \
            else q  # [n, probes]
        cands = []
        for n, i in enumerate(idx):
            row = int(data.rows[i])
            reward = float(data.rewards[i])
            cands.append(CandidateView(
                row=row, sample_index=int(table["sample_index"][row]), completion=str(table["completion"][row]),
                reward=reward, verdict=verdict(table["details"][row], reward),
                q=tuple(float(x) for x in q[n]), p=tuple(float(x) for x in probs[n]),
                credits=tuple(c.get(row) for c in credits)))
        cands.sort(key=lambda c: ((-c.q[0]) if c.q else 0.0, c.sample_index))
        out.append(PromptView(pid, str(table["prompt"][int(data.rows[idx[0]])]), tuple(cands)))
    return out
