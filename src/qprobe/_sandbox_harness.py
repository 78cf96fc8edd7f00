"""The two processes of one sandboxed job: the program's (B) and the tests' (T).

B runs the model-written program, confined (`_sandbox_confine._confine`), and then only answers
requests from T over one socket (fd 3, its only descriptor besides 0-2): call this function, get
this attribute, iterate this object. Every answer is a copy (`_sandbox_codec`). B never learns the
verdict and holds no descriptor that could carry one.

T, the worker's warm test process, never receives or executes model-written code. Per job it
runs the trusted task code (setup, then the tests) with the names the tests use that the program
defines bound to stand-ins: plain values are copies, stdlib modules are imported by T itself,
everything else is a `Remote` handle whose operations are requests to B (`_sandbox_tests.py`). T
alone writes the verdict, on its socket to the worker, which B never holds. The end of this file
turns T's report (and B's exit status) into the job's result.

Standard library only; loaded by path by `_sandbox_worker.py`, after `_sandbox_confine.py` and
`_sandbox_codec.py`.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import operator
import os
import random
import resource
import signal
import sys
import types

import _sandbox_codec as codec
import _sandbox_confine as confine
import _sandbox_tests as tests_mod

# Warm the modules programs and tests import most: B and T find them loaded (without reading a file,
# which T's uid may not be able to do where there is no mount namespace).
WARM = ("bisect", "collections", "copy", "decimal", "fractions", "functools", "heapq", "itertools", "math",
        "random", "re", "statistics", "string", "typing")
for _name in WARM:
    importlib.import_module(_name)

MUTABLE = (list, dict, set, bytearray)  # arguments whose state after a call is sent back to T
NEXT_BATCH_MAX = 1024


# ---------------------------------------------------------------- B: the program's process


class _Table:
    """B's objects that T holds handles to (kept alive, so ids stay unique)."""

    def __init__(self) -> None:
        self.objs: dict[int, object] = {}
        self.ids: dict[int, int] = {}

    def ref(self, obj) -> list:
        hid = self.ids.get(id(obj))
        if hid is None:
            hid = len(self.objs) + 1
            self.objs[hid], self.ids[id(obj)] = obj, hid
        return ["h", hid, str(getattr(type(obj), "__name__", "object"))[:100]]

    def get(self, hid, _type_name: str = ""):
        if type(hid) is not int or hid not in self.objs:
            raise KeyError(f"no object {hid!r}")
        return self.objs[hid]


def _exc_reply(exc: BaseException, table: _Table) -> list:
    kind = "exc" if isinstance(exc, Exception) else "base"
    try:
        args = codec.encode(tuple(exc.args), table.ref) if len(repr(exc.args)) < 4096 else None
    except Exception:  # noqa: BLE001
        args = None
    try:
        msg = str(exc)[:500]
    except Exception:  # noqa: BLE001
        msg = ""
    return [kind, type(exc).__name__[:100], msg, args]


def _serve_one(req: list, g: dict, table: _Table) -> list:
    enc = lambda v: codec.encode(v, table.ref)  # noqa: E731
    dec = lambda v: codec.decode(v, table.get)  # noqa: E731
    op = req[0]
    if op == "names":
        out = []
        for name in req[1]:
            if type(name) is str and name in g:
                v = g[name]
                if isinstance(v, types.ModuleType):
                    out.append([name, "m", str(getattr(v, "__name__", "")), table.ref(v)])
                else:
                    out.append([name, "v", enc(v)])
        return ["ok", out]
    obj = table.get(req[1])
    if op == "call":
        args = [dec(a) for a in req[2]]
        kwargs = {str(k): dec(v) for k, v in req[3]}
        result = obj(*args, **kwargs)
        after = [[i, enc(a)] for i, a in enumerate(args) if type(a) in MUTABLE]
        after += [[k, enc(v)] for k, v in kwargs.items() if type(v) in MUTABLE]
        return ["ok", enc(result), after]
    if op == "next":
        items, end = [], None
        for _ in range(max(1, min(int(req[2]), NEXT_BATCH_MAX))):
            try:
                items.append(enc(next(obj)))
            except Exception as exc:  # noqa: BLE001  StopIteration included
                end = _exc_reply(exc, table)
                break
        return ["ok", ["l", *items], end]
    simple = {"getattr": lambda: getattr(obj, str(req[2])), "iter": lambda: iter(obj), "len": lambda: len(obj),
              "bool": lambda: bool(obj), "str": lambda: str(obj), "repr": lambda: repr(obj),
              "float": lambda: float(obj), "int": lambda: int(obj), "index": lambda: operator.index(obj),
              "format": lambda: format(obj, str(req[2])), "getitem": lambda: obj[dec(req[2])]}
    if op in simple:
        return ["ok", enc(simple[op]())]
    if op == "setattr":
        setattr(obj, str(req[2]), dec(req[3]))
    elif op == "setitem":
        obj[dec(req[2])] = dec(req[3])
    elif op == "delitem":
        del obj[dec(req[2])]
    else:
        raise ValueError(f"unknown request {op!r}")
    return ["ok", None]


def program_main(program: str, fd: int) -> None:
    """In B, confined: run the program, then answer T's requests until T hangs up."""
    module = types.ModuleType("solution")
    sys.modules["solution"] = module
    g = module.__dict__
    try:
        exec(compile(program, "<program>", "exec"), g)
    except BaseException as exc:  # noqa: BLE001
        codec.send(fd, ["perr", type(exc).__name__[:100], str(exc)[:500],
                        tests_mod.fail_line(exc.__traceback__, "<program>", program)])
        os._exit(1)
    table, req = _Table(), codec.recv(fd)  # first T's ["names", [...]]: the names its tests use
    while req is not None:
        try:
            reply = _serve_one(req, g, table)
        except BaseException as exc:  # noqa: BLE001  SystemExit too: T judges it
            reply = _exc_reply(exc, table)
        try:
            codec.send(fd, reply)
        except codec.UncopyableValue as exc:
            codec.send(fd, ["exc", "UncopyableValue", str(exc), None])
        req = codec.recv(fd)
    os._exit(0)


def _place(sock: int, report: int, out: int) -> None:
    """Descriptors 0 (/dev/null), 1-2 (`out`), 3 (`sock`), 4 (`report`); every other one closed."""
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in (os.open(os.devnull, os.O_RDONLY), out, sock, report)]
    for src, dst in zip(high, (0, 1, 3, 4), strict=True):
        os.dup2(src, dst, inheritable=dst < 3)
    os.dup2(1, 2)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    os.closerange(5, min(soft if soft > 0 else 1 << 16, 1 << 16))


def job_main(job: dict, cfg: dict, feats: dict, workdir: str, sock: int, status_w: int, out_w: int,
             sync_r: int) -> None:
    """B: wait until re-parented, keep only 0-2 and the socket, confine, then run the program.

    Whether confinement worked goes to the worker on `status_w`, closed before the program runs.
    """
    try:
        if os.read(sync_r, 1) != b"g":  # the worker says A is reaped and we are its child now
            os._exit(121)
        confine.prctl(confine.PR_SET_DUMPABLE, 1)  # /proc/self ours again (the worker is not dumpable)
        confine.prctl(confine.PR_SET_PDEATHSIG, signal.SIGKILL)  # the worker dies -> so does the whole job
        _place(sock, status_w, out_w)
        status_w = 4
        confine._confine(cfg, feats, workdir)
        os.environ.clear()
        os.environ.update({"HOME": workdir, "TMPDIR": workdir, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False, errors="backslashreplace")
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
    except BaseException as exc:  # noqa: BLE001
        os.write(status_w, repr(exc)[:500].encode())
        os._exit(3)
    os.write(status_w, b"ok")
    os.close(status_w)
    program_main(job["program"], 3)


# ---------------------------------------------------------------- T: the tests' process


def test_server_main(cfg: dict, feats: dict, ctrl: int) -> None:
    """T, the worker's test process, for as many jobs as it is given: its own uid (root), not
    dumpable, rlimits; per job it gets (over `ctrl`, from the worker) the job, its socket to B and
    the job's output pipe, and answers with one report line. The worker kills it when a job times
    out; a per-job CPU limit kills it too."""
    import socket

    try:
        confine.prctl(confine.PR_SET_PDEATHSIG, signal.SIGKILL)
        os.setsid()
        high = fcntl.fcntl(ctrl, fcntl.F_DUPFD_CLOEXEC, 100)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.dup2(high, 3, inheritable=False)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        os.closerange(4, min(soft if soft > 0 else 1 << 16, 1 << 16))
        ctrl = 3
        os.chdir("/")
        if feats["root"]:  # an uid no job runs as: B cannot signal or trace T
            uid = cfg.get("test_uid", cfg["uid"] + 100_000)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        confine.prctl(confine.PR_SET_NO_NEW_PRIVS, 1)
        confine.prctl(confine.PR_SET_DUMPABLE, 0)
        mem = cfg["memory_mb"] << 20
        for lim, val in ((resource.RLIMIT_AS, (mem, mem)), (resource.RLIMIT_FSIZE, (1 << 20,) * 2),
                         (resource.RLIMIT_CORE, (0, 0)), (resource.RLIMIT_NOFILE, (64, 64)), (resource.RLIMIT_NPROC, (0, 0))):
            resource.setrlimit(lim, val)
        os.environ.clear()
        conn = socket.socket(fileno=ctrl)
        fresh = (random.getstate(), sys.getrecursionlimit(), sys.stdout, sys.stderr)
    except BaseException as exc:  # noqa: BLE001
        os.write(ctrl, json.dumps({"outcome": "sandbox", "message": repr(exc)[:500]}).encode() + b"\n")
        os._exit(3)
    while True:
        head, fds, _flags, _addr = socket.recv_fds(conn, 8, 2)
        if len(head) != 8 or len(fds) != 2:
            os._exit(0)
        size, body = int.from_bytes(head, "little"), bytearray()
        while len(body) < size:
            chunk = conn.recv(min(size - len(body), 1 << 20))
            if not chunk:
                os._exit(0)
            body += chunk
        sock, out = fds
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        job = json.loads(body)  # the tests, setup, entry points and limits: never the program
        # Each job starts as the first did: the same random state (tests that draw inputs from the
        # module-level generator stay deterministic), recursion limit and streams.
        random.setstate(fresh[0])
        sys.setrecursionlimit(fresh[1])
        sys.stdout, sys.stderr = fresh[2], fresh[3]
        used = resource.getrusage(resource.RUSAGE_SELF)
        cpu = int(used.ru_utime + used.ru_stime + float(job.get("limits", {}).get("timeout", cfg["timeout"]))) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, resource.RLIM_INFINITY))
        try:
            info = tests_mod.run_tests(job, sock)
        except BaseException as exc:  # noqa: BLE001  (a harness bug: never a pass)
            info = {"outcome": "sandbox", "message": repr(exc)[:500]}
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os.close(sock)
        for fd in (1, 2):
            os.dup2(0, fd)
        os.write(ctrl, json.dumps({**info, "job": job["id"]}).encode() + b"\n")


# ---------------------------------------------------------------- the worker: what the reports mean


def final_report(rep: bytes) -> bool:
    """A complete report from T (one JSON line): the verdict is known before the processes exit."""
    if not rep.endswith(b"\n") or rep.count(b"\n") != 1:
        return False
    try:
        return isinstance(json.loads(rep), dict)
    except ValueError:
        return False


def _code(status) -> int | None:
    """Exit code, or 128 + signal number."""
    if status is None:
        return None
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def verdict(rep: bytes, t_status, b_status, setup: bytes, timed_out: bool, too_much: bool, duration: float,
            tail: str, cfg: dict) -> dict:
    """The result of one job. Only T's report can say passed; B's status only refines an error."""
    res = {"status": "error", "error_type": "", "failing_test": "", "message": "", "stderr_tail": tail,
           "duration": round(duration, 4)}
    near_limit = duration >= cfg["timeout"] * 0.9
    if timed_out:
        return {**res, "status": "timeout", "error_type": "TimeoutError",
                "message": f"wall-clock limit of {cfg['timeout']} s exceeded"}
    if too_much:
        return {**res, "error_type": "OutputLimitExceeded", "message": f"more than {cfg['output_kb']} KiB of output"}
    if setup not in (b"ok", b""):
        return {**res, "error_type": "SandboxError", "message": "confining the job failed: " +
                setup.decode("utf-8", "replace")[:400]}
    lines = rep.splitlines()
    info = None
    if len(lines) == 1:
        try:
            info = json.loads(lines[0])
        except ValueError:
            info = None
    if not isinstance(info, dict) or info.get("outcome") not in ("passed", "failed", "error", "sandbox"):
        code = _code(t_status)
        if code is not None and code > 128 and code - 128 in (signal.SIGXCPU, signal.SIGKILL) and near_limit:
            return {**res, "status": "timeout", "error_type": "TimeoutError", "message": "CPU time limit exceeded"}
        return {**res, "error_type": "TestsDied",
                "message": f"the test process ended without a verdict (exit status {code})"}
    outcome = info["outcome"]
    res.update(error_type=str(info.get("error_type", ""))[:200], message=str(info.get("message", ""))[:500],
               failing_test=str(info.get("line", ""))[:500])
    if outcome == "sandbox":
        return {**res, "error_type": "SandboxError"}
    if info.get("program_gone") and setup != b"ok":
        return {**res, "error_type": "SandboxError", "message": "the job died while being confined"}
    if info.get("program_gone") and info.get("error_type") == "EarlyExit":
        code = _code(b_status)
        sig = code - 128 if code is not None and code > 128 else None
        if sig in (signal.SIGXCPU, signal.SIGKILL) and near_limit:
            return {**res, "status": "timeout", "error_type": "TimeoutError", "message": "CPU time limit exceeded"}
        what = (f"was killed by {_signame(sig)}" if sig else
                f"exited with code {code}" if code is not None else "vanished")
        return {**res, "error_type": "Killed" if sig else "EarlyExit",
                "message": f"the program {what} before its tests finished"}
    return {**res, "status": outcome}
