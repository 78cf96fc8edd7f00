"""MBPP (Austin et al. 2021) with the Q-probe paper's splits and prompt."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from qprobe.core.types import Prompt
from qprobe.errors import ConfigError, DataError
from qprobe.rewards.base import Reward
from qprobe.tasks._data import is_local, load_hf, read_jsonl
from qprobe.tasks.base import Task

# Paper / q_probe code: train = MBPP train + validation (464), test = 500, prompt = few-shot pool.
SPLIT_IDS = {"train": range(511, 975), "test": range(11, 511), "prompt": range(1, 11)}
DOCSTRING_STOP = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```")
CHAT_TEMPLATE = ("{text}\nYour code should pass this test:\n{test}\n"
                 "Write the Python function in a single ```python code block.")
FORMATS = ("docstring", "chat")


def entry_points(reference: str, tests: str) -> list[str]:
    """The reference's top-level functions and classes that the tests use (trusted: from the data,
    not the model). They may shadow a builtin the tests call (task 126 defines `sum`)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes in the data's regexes
            defined = {n.name for n in ast.parse(reference).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            used = {n.id for n in ast.walk(ast.parse(tests)) if isinstance(n, ast.Name)}
    except SyntaxError:
        return []
    return sorted(defined & used)


def docstring_prompt(text: str, first_test: str) -> str:
    """The zero-shot prompt of the paper (InCoder style): problem and first test in a docstring."""
    return f'"""\n{text}\n{first_test}\n"""\n'


# A chat answer is done once its code block closes; the explanation after it is not needed.
CHAT_STOP = ("\n```\n",)


class MBPPTask(Task):
    """MBPP. Options: data (a path to mbpp.jsonl or a folder holding it, or a Hugging Face dataset
    name such as 'google-research-datasets/mbpp'), prompt_format ('docstring' | 'chat'), timeout."""

    name = "mbpp"
    splits = tuple(SPLIT_IDS)

    def __init__(self, data: str | None = None, prompt_format: str = "docstring", timeout: float | str = 3.0) -> None:
        if data is None:
            raise ConfigError("expected the MBPP data, got none; pass --task-option data=PATH/mbpp.jsonl "
                              "(or a Hugging Face name, e.g. data=google-research-datasets/mbpp)")
        if prompt_format not in FORMATS:
            raise ConfigError(f"expected prompt_format in {list(FORMATS)}, got '{prompt_format}'")
        self.data, self.prompt_format, self.timeout = str(data), prompt_format, float(timeout)
        self.stop = DOCSTRING_STOP if prompt_format == "docstring" else CHAT_STOP
        self._rows: dict[int, dict[str, Any]] | None = None

    def rows(self) -> dict[int, dict[str, Any]]:
        if self._rows is None:
            if is_local(self.data):
                path = Path(self.data).expanduser()
                rows = read_jsonl(path / "mbpp.jsonl" if path.is_dir() else path)
            else:
                rows = load_hf(self.data, "full")
            self._rows = {int(r["task_id"]): r for r in rows}
            missing = [i for i in range(1, 975) if i not in self._rows]
            if missing:
                raise DataError(f"expected MBPP task ids 1-974 in '{self.data}', got {len(self._rows)} rows "
                                f"({len(missing)} missing, e.g. {missing[:3]}); pass the full mbpp.jsonl")
        return self._rows

    def prompts(self, split: str) -> list[Prompt]:
        self.check_split(split)
        rows = self.rows()
        return [self.make_prompt(rows[i]) for i in SPLIT_IDS[split]]

    def make_prompt(self, row: dict[str, Any]) -> Prompt:
        tests = "\n".join(row["test_list"]) + "\n"
        setup = row.get("test_setup_code") or ""
        # test_setup_code (tasks 367, 927 build trees with the program's Node) runs with the tests.
        tests = (setup + "\n" + tests) if setup.strip() else tests
        meta = {"task_id": int(row["task_id"]), "tests": tests, "entry_points": entry_points(row["code"], tests),
                "reference": row["code"], "stop": list(self.stop)}
        if self.prompt_format == "docstring":
            text = docstring_prompt(row["text"], row["test_list"][0])
            return Prompt(id=f"mbpp/{row['task_id']}", text=text, meta=meta, reward_prefix=text)
        content = CHAT_TEMPLATE.format(text=row["text"], test=row["test_list"][0])
        return Prompt(id=f"mbpp/{row['task_id']}", text=content, messages=({"role": "user", "content": content},),
                      meta=meta)

    def reward(self) -> Reward:
        from qprobe.rewards.code import UnitTestReward

        return UnitTestReward(timeout=self.timeout)

    def manifest(self) -> dict[str, Any]:
        return {"task": self.name, "data": self.data, "prompt_format": self.prompt_format, "stop": list(self.stop),
                "splits": {k: f"task_id {v.start}-{v.stop - 1}" for k, v in SPLIT_IDS.items()},
                "template": docstring_prompt("{text}", "{test_list[0]}") if self.prompt_format == "docstring"
                else CHAT_TEMPLATE}
