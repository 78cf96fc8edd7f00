"""Few-shot examples drawn from a collected run: the paper's "5-shot on successes" (section 6.1).

`shots_from_run(path, k, seed)` draws the examples the paper's way: k distinct problems, chosen at
random among those with at least one success in a collected run (usually the training split),
and one random successful completion of each. The run's task is rebuilt from its manifest to get
each problem's prompt in both forms; which samples were drawn is recorded in the new run's
manifest (`FewShotTask.manifest`), so a resumed run refuses different shots.

    qprobe collect --task mbpp --split test --shots-from runs/mbpp-train --shots 5 --n 1 --temperature 0 ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qprobe.catalog import TASKS
from qprobe.core.types import Prompt
from qprobe.errors import ConfigError, DataError
from qprobe.store import Run
from qprobe.tasks.fewshot import Shot


def shots_from_run(path: str, k: int = 5, seed: int = 0, keep: list[dict[str, Any]] | None = None,
                   avoid: list[Prompt] | None = None, avoid_task: str = "") -> list[Shot]:
    """k solved examples drawn from a collected run: k distinct problems with a success, one
    successful completion each, both chosen uniformly at random with `seed`. `keep` (the "shots"
    of a run being resumed) takes those samples again instead, even if the run has grown since.
    When one of them is the problem of a prompt in `avoid` (the prompts of task `avoid_task` to be
    collected: a run of the same split), one spare example of another problem is drawn after them
    (`"spare": true`); `FewShotTask` gives each prompt the first k that are not its own problem."""
    if k < 1:
        raise ConfigError(f"expected --shots >= 1, got {k}")
    run = Run.open(path)
    rows = run.table(columns=["prompt_id", "sample_index", "completion", "reward"]).to_pylist()
    wins: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["reward"] is not None and r["reward"] >= 1.0:
            wins.setdefault(r["prompt_id"], []).append(r)
    if len(wins) < k:
        raise DataError(f"expected at least {k} problems with a success in '{path}', got {len(wins)}; "
                        "collect more training samples or pass a smaller --shots")
    rng = np.random.default_rng(seed)
    ids = sorted(wins)
    chosen = [ids[i] for i in sorted(rng.choice(len(ids), size=k, replace=False))]
    if keep is not None:
        chosen = [src["prompt_id"] for src in keep]
        kept = {(src["prompt_id"], int(src["sample_index"])) for src in keep}
        wins = {pid: [r for r in wins.get(pid, []) if (pid, r["sample_index"]) in kept] for pid in chosen}
        if sum(not src.get("spare") for src in keep) != k or any(len(v) != 1 for v in wins.values()):
            raise DataError(f"expected the {len(keep)} solved examples this run was started with in '{path}' "
                            f"(with --shots {len(keep)}), got --shots {k} or a run without them; "
                            "pass the same --shots-from and --shots, or start a new run")
    task_m = run.manifest.get("task", {})
    source = TASKS.create(task_m["name"], **task_m.get("options", {}))
    by_id = {p.id: p for p in source.prompts(task_m["split"])}
    spare = {src["prompt_id"] for src in keep if src.get("spare")} if keep is not None else set()

    def shot(pid: str) -> Shot:
        cands = sorted(wins[pid], key=lambda r: r["sample_index"])
        pick = cands[int(rng.integers(len(cands)))]
        if pid not in by_id:
            raise DataError(f"expected problem '{pid}' of '{path}' in task {task_m['name']}/{task_m['split']}, "
                            "got none; the task's data changed since the run was collected")
        source = {"run": Path(str(path)).name, "prompt_id": pid, "sample_index": int(pick["sample_index"])}
        return Shot(by_id[pid], pick["completion"], {**source, "spare": True} if pid in spare else source,
                    task=task_m["name"])

    shots = [shot(pid) for pid in chosen]
    targets = list(avoid or [])
    if keep is None and any(s.is_problem_of(p, avoid_task) for s in shots for p in targets):
        rest = [i for i in ids if i not in chosen]
        if not rest:
            raise DataError(f"expected a problem with a success in '{path}' besides the {k} drawn, to replace a "
                            "prompt's own problem among its examples, got none; pass a smaller --shots")
        pid = rest[int(rng.integers(len(rest)))]
        spare.add(pid)
        shots.append(shot(pid))
    return shots
