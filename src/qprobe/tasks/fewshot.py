"""Few-shot prompts from successes: the paper's "5-shot on successes" baseline (section 6.1).

`FewShotTask(inner, shots)` puts `shots` (solved examples: a prompt and a completion that earned
reward 1) in front of every prompt of `inner`: earlier user/assistant turns in the chat form,
plain text before the prompt in the completion form. Rewards, stop sequences and splits are the
inner task's; only the context changes, so the reward still sees the completion alone (plus the
inner prompt's own `reward_prefix`).

`shots_from_run(path, k, seed)` draws the examples the paper's way: k distinct problems, chosen at
random among those with at least one success in a collected run (usually the training split),
and one random successful completion of each. The run's task is rebuilt from its manifest to get
each problem's prompt in both forms; which samples were drawn is recorded in the new run's
manifest, so a resumed run refuses different shots. A prompt never sees its own problem among its
examples (a run of the same split could hold it): when a drawn example is one of the prompts to be
collected (same text, or same id of the same task), one spare example of another problem is drawn
after the others (recorded with `"spare": true`), and each prompt takes the first k examples that
are not its own problem.

    qprobe collect --task mbpp --split test --shots-from runs/mbpp-train --shots 5 --n 1 --temperature 0 ...
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.errors import ConfigError, DataError
from qprobe.tasks.base import Prompt, Reward, Task

# Between examples in the completion (non-chat) form.
SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Shot:
    """One solved example: the problem's prompt and a completion that passed."""

    prompt: Prompt
    completion: str
    source: dict[str, Any]  # where it came from: {"run", "prompt_id", "sample_index"} (+ "spare")
    task: str = field(default="", compare=False)  # the source run's task name

    def is_problem_of(self, prompt: Prompt, task: str) -> bool:
        """Whether this example is `prompt`'s own problem (its solution must not be in its context)."""
        return self.prompt.text == prompt.text or (self.task == task and self.prompt.id == prompt.id)


def with_shots(prompt: Prompt, shots: list[Shot]) -> Prompt:
    """`prompt` with `shots` in front: earlier turns (chat form) and leading text (completion form)."""
    text = "".join(s.prompt.text + s.completion + SEPARATOR for s in shots) + prompt.text
    messages = None
    if prompt.messages is not None:
        turns: list[dict[str, str]] = []
        for s in shots:
            user = list(s.prompt.messages) if s.prompt.messages else [{"role": "user", "content": s.prompt.text}]
            turns += [m for m in user if m.get("role") != "system"]
            turns.append({"role": "assistant", "content": s.completion})
        system = [m for m in prompt.messages if m.get("role") == "system"]
        rest = [m for m in prompt.messages if m.get("role") != "system"]
        messages = tuple(system + turns + rest)
    return replace(prompt, text=text, messages=messages)


class FewShotTask(Task):
    """`inner` with the same solved examples in front of every prompt."""

    def __init__(self, inner: Task, shots: list[Shot]) -> None:
        if not shots:
            raise ConfigError("expected at least one few-shot example, got none; pass --shots K with K >= 1")
        self.inner, self.shots = inner, list(shots)
        self.k = sum(1 for s in self.shots if not s.source.get("spare"))
        self.name, self.splits, self.stop = inner.name, inner.splits, inner.stop

    def shots_for(self, prompt: Prompt) -> list[Shot]:
        """The first k examples that are not `prompt`'s own problem."""
        return [s for s in self.shots if not s.is_problem_of(prompt, self.inner.name)][: self.k]

    def prompts(self, split: str) -> list[Prompt]:
        out = []
        for p in self.inner.prompts(split):
            shots = self.shots_for(p)
            if len(shots) < self.k:
                raise DataError(f"expected {self.k} examples of other problems for prompt {p.id}, got {len(shots)}; "
                                "start a new run (older runs drew no spare example)")
            out.append(with_shots(p, shots))
        return out

    def reward(self) -> Reward:
        return self.inner.reward()

    def manifest(self) -> dict[str, Any]:
        return {**self.inner.manifest(), "shots": [s.source for s in self.shots]}


def shots_from_run(path: str, k: int = 5, seed: int = 0, keep: list[dict[str, Any]] | None = None,
                   avoid: list[Prompt] | None = None, avoid_task: str = "") -> list[Shot]:
    """k solved examples drawn from a collected run: k distinct problems with a success, one
    successful completion each, both chosen uniformly at random with `seed`. `keep` (the "shots"
    of a run being resumed) takes those samples again instead, even if the run has grown since.
    When one of them is the problem of a prompt in `avoid` (the prompts of task `avoid_task` to be
    collected), one spare
    example of another problem follows them (see the module docstring)."""
    from qprobe.registry import TASKS
    from qprobe.store import Run

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

