"""A reference point that is not a probe: run each candidate on the test its prompt shows.

An MBPP prompt shows the first of the problem's tests ("Your code should pass this test: ...").
Executing a candidate on it uses nothing hidden (CodeT / AlphaCode-style filtering), but it runs
model-written code at selection time, which a Q-probe never needs. It is reported beside the
probes, as the yardstick a user would compare them with, not as one of them.

A stored sample passed the visible test iff its reward is 1 or the assertion it failed first is one
of the hidden tests (the tests run in order, the visible one first), so no code is re-run here. The
score Q + C * passed (C far above Q's range) makes softmax(score / beta) pick among the candidates
that pass the visible test, by Q, or among all k when none does; expected returns stay exact.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from qprobe.catalog import TASKS


def passed_visible(split: Any) -> np.ndarray | None:
    """[N] 1.0 where the sample passed its prompt's visible test; None unless the run is MBPP."""
    run = split.cache.run
    task = run.manifest.get("task", {})
    if task.get("name") != "mbpp":
        return None
    hidden = {p.id: {t.strip() for t in p.meta["tests"].splitlines()
                     if t.strip().startswith("assert") and t.strip() not in p.text}
              for p in TASKS.create("mbpp", **task.get("options", {})).prompts(task["split"])}
    failing = [json.loads(d or "{}").get("failing_test", "").strip() for d in split.column("details")]
    return np.array([float(r >= 1 or f in hidden[p]) for p, f, r in zip(split.prompt_ids, failing, split.rewards,
                                                                          strict=True)])


def filtered(q: np.ndarray, vis: np.ndarray) -> np.ndarray:
    """Scores that put every candidate passing the visible test above every other, ordered by q."""
    return q + vis * 100.0 * (np.ptp(q) + 1.0)


def section(ex: Any, key: tuple[str, ...]) -> dict[str, Any]:
    """Per MBPP test split: the visible-test filter alone (random among passers) and with pg."""
    from methods import Method, seed_values

    pg = Method("pg", keys=key)
    rows: dict[str, dict[str, Any]] = {"visible-test filter, random among passers": {},
                                       "pg + visible-test filter": {}}
    rates: dict[str, Any] = {}
    for split, sp in ex.tests.items():
        vis = passed_visible(sp)
        if vis is None:
            for name in rows:
                rows[name][split] = None
            continue
        r = sp.rewards
        rates[split] = {"passed_visible": float(vis.mean()), "reward_given_passed": float(r[vis > 0].mean()),
                        "reward_given_failed": float(r[vis == 0].mean()) if (vis == 0).any() else None}
        only = seed_values(sp, [filtered(np.zeros(len(sp)), vis)], ex.k, ex.args.beta)
        scores = [ex.fits.scores(pg, s)[split] for s in range(ex.args.seeds)]
        both = seed_values(sp, [filtered(q, vis) for q in scores], ex.k, ex.args.beta)
        rows["visible-test filter, random among passers"][split] = ex.row(split, only, ex.k)
        rows["pg + visible-test filter"][split] = ex.row(split, both, ex.k)
    return {"rows": rows, "rates": rates}
