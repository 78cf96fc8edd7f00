"""Your own prompts from a JSON Lines file, rewarded by unit tests or by your own function.

Each line: {"id": ..., "prompt": "...", "tests": "assert f(1) == 2"} (unit tests, run in the
sandbox) or {"id": ..., "prompt": "...", ...any fields...} with the option reward=module:function
(called as function(prompt, completion) -> float | None; prompt.meta holds the line's fields).
An optional "split" field groups lines into splits; without it the single split is "all".
Optional "messages" (a chat list) and "prefix" (prepended to the completion before testing).
With unit tests, optional "setup" (trusted code run before the tests, beside them: helpers the
tests call, which a completion cannot redefine) and "entry_points" (the names of the program's
functions the tests call; only needed when one shadows a builtin, such as `sum`).
"""

from __future__ import annotations

from typing import Any

from qprobe.core.types import Prompt
from qprobe.errors import ConfigError, DataError
from qprobe.rewards.base import Reward
from qprobe.tasks._data import read_jsonl
from qprobe.tasks.base import Task


class JsonlTask(Task):
    name = "jsonl"

    def __init__(self, data: str | None = None, reward: str = "unit-tests", timeout: float | str = 3.0,
                 prompt_format: str = "text", stop: str = "") -> None:
        if not data:
            raise ConfigError("expected a JSON Lines file of prompts, got none; pass --task-option data=PATH.jsonl")
        self.data, self.reward_name, self.timeout, self.prompt_format = str(data), reward, float(timeout), prompt_format
        self.stop = tuple(s.encode().decode("unicode_escape") for s in stop.split("|") if s) if stop else ()
        self.rows = read_jsonl(self.data)
        for i, row in enumerate(self.rows, 1):
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise DataError(f"expected a 'prompt' string on every line of '{data}', got none on line {i}")
            if reward == "unit-tests" and not isinstance(row.get("tests"), str):
                raise DataError(f"expected a 'tests' string on line {i} of '{data}' (reward unit-tests); "
                                "add tests or pass --task-option reward=module:function")
            entries = row.get("entry_points", [])
            if not isinstance(row.get("setup", ""), str) or not (
                    isinstance(entries, list) and all(isinstance(e, str) for e in entries)):
                raise DataError(f"expected 'setup' to be a string and 'entry_points' a list of names on line {i} "
                                f"of '{data}', got {row.get('setup')!r} / {entries!r}")
        names = [str(r["split"]) for r in self.rows if "split" in r]
        self.splits = tuple(dict.fromkeys(names)) if names else ("all",)

    def prompts(self, split: str) -> list[Prompt]:
        self.check_split(split)
        out = []
        for i, row in enumerate(self.rows):
            if self.splits != ("all",) and str(row.get("split")) != split:
                continue
            meta: dict[str, Any] = {k: v for k, v in row.items() if k not in ("prompt", "messages", "prefix")}
            meta["stop"] = list(self.stop)
            messages = row.get("messages")
            if self.prompt_format == "chat" and not messages:
                messages = [{"role": "user", "content": row["prompt"]}]
            out.append(Prompt(id=str(row.get("id", i)), text=row["prompt"],
                              messages=tuple(messages) if messages else None, meta=meta,
                              reward_prefix=str(row.get("prefix", ""))))
        return out

    def reward(self) -> Reward:
        if self.reward_name == "unit-tests":
            from qprobe.rewards.code import UnitTestReward

            return UnitTestReward(timeout=self.timeout)
        from qprobe.rewards.custom import CallableReward

        return CallableReward(self.reward_name)

    def manifest(self) -> dict[str, Any]:
        return {"task": self.name, "data": self.data, "reward": self.reward_name, "splits": list(self.splits)}
