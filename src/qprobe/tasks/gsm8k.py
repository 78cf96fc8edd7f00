"""GSM8K (Cobbe et al. 2021): final-number answers, and a program-aided variant run in the sandbox."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qprobe.core.types import Prompt
from qprobe.errors import ConfigError, DataError, require
from qprobe.rewards.base import Reward
from qprobe.tasks._data import is_local, read_jsonl
from qprobe.tasks.base import Task

PLAIN_TEMPLATE = "Question: {question}\nAnswer:"
PLAIN_STOP = ("\n\nQuestion:", "\nQuestion:")
CHAT_TEMPLATE = ("Solve this grade-school maths problem step by step, then give the final answer alone on "
                 "the last line as '#### <number>'.\n\n{question}")
PAL_TEMPLATE = ('"""{question}\n\nWrite solution() so that it returns the answer as a number."""\n\n\n'
                "def solution():\n")
PAL_STOP = ("\ndef ", "\nclass", "\nif __name__", "\nprint", "\n#", '\n"""')
PAL_CHAT_TEMPLATE = ("Write a Python function solution() that takes no arguments and returns the answer to this "
                     "problem as a number. Answer with a single ```python code block.\n\n{question}")


def reference_answer(solution: str) -> str:
    """The number after GSM8K's '#### ' (commas removed)."""
    if "####" not in solution:
        raise DataError(f"expected a GSM8K answer ending in '#### N', got {solution[-80:]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "")


class GSM8KTask(Task):
    """GSM8K; splits train / test. Options: data (a folder with train.jsonl and test.jsonl, or a
    Hugging Face name such as 'openai/gsm8k'), prompt_format ('plain' | 'chat')."""

    name = "gsm8k"
    splits = ("train", "test")
    formats = ("plain", "chat")

    def __init__(self, data: str | None = None, prompt_format: str | None = None, timeout: float | str = 3.0) -> None:
        if data is None:
            raise ConfigError("expected the GSM8K data, got none; pass --task-option data=FOLDER "
                              "(holding train.jsonl and test.jsonl) or data=openai/gsm8k")
        prompt_format = prompt_format or self.formats[0]
        if prompt_format not in self.formats:
            raise ConfigError(f"expected prompt_format in {list(self.formats)}, got '{prompt_format}'")
        self.data, self.prompt_format, self.timeout = str(data), prompt_format, float(timeout)
        self.stop = self.default_stop() if prompt_format == self.formats[0] else ()

    def default_stop(self) -> tuple[str, ...]:
        return PLAIN_STOP

    def rows(self, split: str) -> list[dict[str, Any]]:
        if is_local(self.data):
            path = Path(self.data).expanduser()
            if path.is_dir():
                return read_jsonl(path / f"{split}.jsonl")
            raise DataError(f"expected a folder holding {split}.jsonl, got '{path}'")
        datasets = require("datasets", "datasets")
        try:
            return [dict(r) for r in datasets.load_dataset(self.data, "main", split=split)]
        except Exception as exc:  # noqa: BLE001  network, name or cache errors all mean the same here
            raise DataError(f"expected a loadable Hugging Face dataset, got '{self.data}' ({exc}); "
                            "pass a local folder with data=PATH") from exc

    def prompts(self, split: str) -> list[Prompt]:
        self.check_split(split)
        return [self.make_prompt(split, i, r) for i, r in enumerate(self.rows(split))]

    def make_prompt(self, split: str, i: int, row: dict[str, Any]) -> Prompt:
        meta = {"answer": reference_answer(row["answer"]), "solution": row["answer"], "stop": list(self.stop)}
        if self.prompt_format == "plain":
            return Prompt(id=f"gsm8k/{split}/{i}", text=PLAIN_TEMPLATE.format(question=row["question"]), meta=meta)
        content = CHAT_TEMPLATE.format(question=row["question"])
        return Prompt(id=f"gsm8k/{split}/{i}", text=content, messages=({"role": "user", "content": content},), meta=meta)

    def reward(self) -> Reward:
        from qprobe.rewards.math import AnswerMatchReward

        return AnswerMatchReward()

    def manifest(self) -> dict[str, Any]:
        from qprobe.rewards.math import ANSWER_REGEX, NUMBER_REGEX

        return {"task": self.name, "data": self.data, "prompt_format": self.prompt_format, "stop": list(self.stop),
                "answer_regex": ANSWER_REGEX, "number_regex": NUMBER_REGEX}


class GSM8KProgramTask(GSM8KTask):
    """GSM8K, program-aided: the model writes `solution()`; its return value, computed in the
    sandbox, is compared with the reference. prompt_format 'completion' | 'chat'."""

    name = "gsm8k-pal"
    formats = ("completion", "chat")

    def default_stop(self) -> tuple[str, ...]:
        return PAL_STOP

    def make_prompt(self, split: str, i: int, row: dict[str, Any]) -> Prompt:
        meta = {"answer": reference_answer(row["answer"]), "solution": row["answer"], "stop": list(self.stop)}
        pid = f"gsm8k-pal/{split}/{i}"
        if self.prompt_format == "completion":
            text = PAL_TEMPLATE.format(question=row["question"])
            return Prompt(id=pid, text=text, meta=meta, reward_prefix=text)
        content = PAL_CHAT_TEMPLATE.format(question=row["question"])
        return Prompt(id=pid, text=content, messages=({"role": "user", "content": content},), meta=meta)

    def reward(self) -> Reward:
        from qprobe.rewards.math import ProgramAnswerReward

        return ProgramAnswerReward(timeout=self.timeout)

    def manifest(self) -> dict[str, Any]:
        return {"task": self.name, "data": self.data, "prompt_format": self.prompt_format, "stop": list(self.stop),
                "template": PAL_TEMPLATE if self.prompt_format == "completion" else PAL_CHAT_TEMPLATE}
