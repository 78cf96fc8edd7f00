"""The only place that runs model-written code.

`check(program, tests)` runs a Python program in a child process, judges it with its tests
(e.g. asserts) in another, and says whether every test ran to the end. `check_many` does the
same for a batch, in parallel. Nothing runs unless the user opted in (`--allow-code-execution`
on the CLI, or `QPROBE_ALLOW_CODE_EXECUTION=1`).

How: a few warm worker processes (`python -I qprobe/_sandbox_worker.py`, started with an empty
environment) each fork one fresh child per program. The child gets its own network (none), pid,
mount and IPC namespaces and a root file system of its own: an empty tmpfs holding read-only
binds of /usr, /bin, /lib*, /etc, Python's own directories and a few devices, a size-capped tmpfs
as its working directory (also HOME and TMPDIR), a fresh /proc, and no privileges (as root: an
unused uid; as an ordinary user: a nested user namespace that owns nothing). Nothing of the
user's home, /tmp or /root is visible to it. Always: its own session, a cgroup (memory, pids, CPU
accounting) where this process may write one, rlimits (address space, CPU, file size, open files,
processes, no core), stdin at EOF, captured and capped output. The time limit is on CPU time of
all the job's processes (the cgroup's, else summed from /proc), with a wall-clock backstop of
4 x the limit + 2 s, enforced from outside; killing the job kills its whole process tree; a
timeout is retried once before it is cached. `isolation_level()` says which of these are in effect.

Fail closed: below net + pid + mount isolation (no user namespaces for an ordinary user, a
container without the rights, macOS) code runs only with a second opt-in, `--allow-unconfined` or
`QPROBE_ALLOW_UNCONFINED=1`; otherwise `UnconfinedSandbox` says what is missing and how to get it.

Who decides the verdict (threat model). The program may be written to attack the harness: it
controls its whole process, its memory, frames, heap and descriptors. So it never shares a process
with the tests. Each worker has two kinds of children:
- B, one per job, runs the program, confined as above, and then only answers requests over one
  socket, its only descriptor besides 0-2: call this function, read this attribute, iterate this.
- T, the worker's test process (warm, reused; killed and restarted when a job times out), runs the
  tests (trusted task code) and never receives or executes model-written code. The names the tests
  use resolve to the task's trusted `setup` (e.g. HumanEval's `poly`), then T's own builtins, then
  the program's names (`entry_points` declared by the task win over both). Values come back from
  B as copies in a tagged JSON encoding (`_sandbox_codec`: no pickle, size- and depth-capped) that
  T decodes only into exact builtin types, so every comparison runs T's code on plain data; objects
  the program defines are opaque handles whose `==` is identity; stdlib modules the program
  imported are imported by T itself. The verdict is T's report on a socket between T and the
  worker that B never holds (the process B is forked from closes it before anything else).
B cannot reach T: it lives in its own pid namespace (it cannot see T), as root runs under another
uid than T, and T is not dumpable (no ptrace, no /proc/T/fd). Each job starts T from the same
state (random state, recursion limit, streams), so a job cannot influence the next one's tests. B's exit, crash, garbage on the
socket or a BaseException (SystemExit...) in a call only ever give an error; T has its own rlimits
and the job's wall clock, so a test looping on a huge value the program returned ends in timeout.

Not covered: a program that gets the answers right by other means (memorised tests) passes;
tests that ask the program to judge itself are answered by the program (a method call such as
`obj.is_valid()`, the truth value of a handle in `assert f(x)`, iteration of a handle, so `x in
handle`; `handle != value` is True); weak tests stay weak; kernel bugs and namespace escapes;
timing side channels. Without a pid namespace (an unconfined opt-in) a non-root program can kill
T: an error, never a pass. Copies are not the program's objects: subclasses of builtins arrive as
their base value (a namedtuple is a tuple, a Counter a dict), numpy scalars as Python numbers;
numpy arrays, deques and dict views are handles; only list/dict/set/bytearray arguments are
copied back after a call (in-place mutation), not objects the program kept.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from qprobe._sandbox_pool import Pool as _Pool
from qprobe._sandbox_pool import Worker as _Worker  # noqa: F401 (tests start one directly)
from qprobe.errors import CodeExecutionNotAllowed, UnconfinedSandbox

ENV_VAR = "QPROBE_ALLOW_CODE_EXECUTION"
UNCONFINED_ENV_VAR = "QPROBE_ALLOW_UNCONFINED"
STATUSES = ("passed", "failed", "timeout", "error")


@dataclass(frozen=True)
class Limits:
    """Resource limits of one program run (sizes in MiB / KiB)."""

    memory_mb: int = 2048  # address space
    disk_mb: int = 64  # the tmpfs working directory
    file_mb: int = 16  # largest file the program may write
    output_kb: int = 1024  # stdout+stderr beyond this stops the program (status error)
    tail_bytes: int = 2048  # how much of the output tail is kept in the result
    nproc: int = 64
    nofile: int = 128


@dataclass(frozen=True)
class TaskTests:
    """Trusted task code that judges a program: `code` (the tests), `setup` run before them (the
    task's own helpers, e.g. HumanEval's `poly`: they win over the program's definitions of the same
    names) and `entry_points` (the program's names the tests call; these win even over builtins,
    e.g. an MBPP problem whose function is called `sum`). A plain string is `TaskTests(code=string)`."""

    code: str
    setup: str = ""
    entry_points: tuple[str, ...] = ()


def _tests(t: str | TaskTests) -> TaskTests:
    return t if isinstance(t, TaskTests) else TaskTests(str(t))


@dataclass(frozen=True)
class Result:
    """The verdict on one (program, tests) pair; `details()` is JSON-serialisable."""

    status: str  # passed | failed | timeout | error
    error_type: str = ""  # e.g. AssertionError, NameError, TimeoutError, Killed, EarlyExit
    failing_test: str = ""  # the source line of the statement that failed, when known
    message: str = ""
    stderr_tail: str = ""  # the last bytes of stdout+stderr together
    duration: float = 0.0  # seconds, wall clock
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def details(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return {**d, **self.extra}


# ------------------------------------------------------------------ opt-in


def allow() -> None:
    """Opt in for this process (what `--allow-code-execution` does)."""
    os.environ[ENV_VAR] = "1"


def allowed() -> bool:
    return os.environ.get(ENV_VAR, "") == "1"


def require_opt_in() -> None:
    """Raise CodeExecutionNotAllowed unless the user opted in to running model-written code."""
    if not allowed():
        raise CodeExecutionNotAllowed(
            "expected an explicit opt-in before running model-written code, got none; this reward "
            "executes programs written by a language model, which may be wrong or harmful (they run "
            f"in a sandbox, with {isolation_level()} isolation, but no sandbox is perfect); to accept "
            f"the risk pass --allow-code-execution on the command line or set {ENV_VAR}=1"
        )
    require_confinement()


def allow_unconfined() -> None:
    """The second opt-in (what `--allow-unconfined` does): run code even below net+pid+mount isolation."""
    os.environ[UNCONFINED_ENV_VAR] = "1"


def unconfined_allowed() -> bool:
    return os.environ.get(UNCONFINED_ENV_VAR, "") == "1"


def confined(features: dict[str, Any]) -> bool:
    """Net + pid + mount namespaces with the job's own read-only root: the level code runs at by default."""
    return all(features.get(k) for k in ("net", "pid", "mount", "readonly"))


def _how_to_confine(features: dict[str, Any], platform: str = sys.platform) -> str:
    if "QPROBE_SANDBOX_MINIMAL" in features.get("why", ""):
        return "unset QPROBE_SANDBOX_MINIMAL"
    if not platform.startswith("linux"):
        return (f"on {platform} there are no Linux namespaces, so the sandbox can only limit resources "
                "and code runs only with the second opt-in")
    if features.get("root"):
        return ("in a container, start it with --privileged, or with --security-opt seccomp=unconfined "
                "--security-opt apparmor=unconfined --security-opt systempaths=unconfined (docker, podman)")
    return ("allow unprivileged user namespaces: sysctl -w kernel.unprivileged_userns_clone=1 (Debian, older "
            "kernels) and user.max_user_namespaces=15000 (if 0), on Ubuntu 23.10+ sysctl -w "
            "kernel.apparmor_restrict_unprivileged_userns=0; in a container, --security-opt seccomp=unconfined "
            "--security-opt apparmor=unconfined --security-opt systempaths=unconfined; or run as root")


def require_confinement() -> None:
    """Raise UnconfinedSandbox if isolation is below net+pid+mount here and there is no second opt-in."""
    isolation_level()
    if confined(_FEATURES) or unconfined_allowed():
        return
    missing = [k for k in ("net", "pid", "mount") if not _FEATURES.get(k)] or ["read-only root"]
    why = _FEATURES.get("why") or "unknown reason"
    raise UnconfinedSandbox(
        f"expected net+pid+mount isolation before running model-written code, got {_LEVEL} (missing: "
        f"{', '.join(missing)}; {why}); to get it, {_how_to_confine(_FEATURES)}; to run it anyway with "
        f"resource limits only, pass --allow-unconfined or set {UNCONFINED_ENV_VAR}=1"
    )


_POOL = _Pool(lambda: asdict(Limits()))
atexit.register(_POOL.close)
_CACHE: OrderedDict[str, Result] = OrderedDict()
_CACHE_SIZE = 50_000
_CACHE_LOCK = threading.Lock()
_LEVEL: str | None = None
_FEATURES: dict[str, Any] = {}


def isolation_level() -> str:
    """The isolation in effect, e.g. 'namespaces(net,pid,mount)+tmpfs-cwd+proc+ro-root+setuid+rlimits'.

    Detected once (by starting a worker, which runs no user code).
    """
    global _LEVEL
    if _LEVEL is None:
        worker = _POOL.acquire()
        _FEATURES.update(worker.features)
        _LEVEL = worker.level
        _POOL.release(worker)
    return _LEVEL


def _key(program: str, tests: TaskTests, timeout: float, limits: Limits) -> str:
    h = hashlib.sha256()
    for part in (program, tests.code, tests.setup, repr(tests.entry_points), repr(float(timeout)), repr(limits)):
        h.update(part.encode("utf-8", "surrogatepass") + b"\x00")
    return h.hexdigest()


def _run_one(program: str, tests: TaskTests, timeout: float, limits: Limits) -> Result:
    worker = _POOL.acquire()
    raw = None
    try:
        raw = worker.run(program, tests, timeout, limits)
    finally:
        if raw is None:  # the worker died or hung: never reuse it
            worker.proc.kill()
            worker.proc.wait()
        _POOL.release(worker)
    if raw is None:
        return Result("error", "SandboxError", message="the sandbox worker died or stopped answering")
    return Result(**{k: raw.get(k, "") for k in ("status", "error_type", "failing_test", "message", "stderr_tail")},
                  duration=float(raw.get("duration", 0.0)),
                  extra={k: raw[k] for k in ("cpu_time", "clock", "limit_hit") if k in raw})


def _run_retrying(program: str, tests: TaskTests, timeout: float, limits: Limits) -> Result:
    """A timeout is run once more (at once, in this thread) before it counts: load should not cost a reward."""
    r = _run_one(program, tests, timeout, limits)
    if r.status != "timeout":
        return r
    again = _run_one(program, tests, timeout, limits)
    return Result(**{**asdict(again), "extra": {**again.extra, "retried": True}})


def check(program: str, tests: str | TaskTests, timeout: float = 3.0, limits: Limits | None = None) -> Result:
    """Run `program`, then judge it with `tests`; passed only if every test statement completed."""
    return check_many([(program, tests)], timeout=timeout, limits=limits)[0]


def check_many(pairs: Sequence[tuple[str, str | TaskTests]], timeout: float = 3.0, workers: int | None = None,
               limits: Limits | None = None) -> list[Result]:
    """`check` for many (program, tests) pairs in parallel; identical pairs run once (cached)."""
    jobs = [(p, _tests(t)) for p, t in pairs]
    require_opt_in()
    limits = limits or Limits()
    if not (isinstance(timeout, (int, float)) and 0 < timeout <= 3600):
        from qprobe.errors import ConfigError

        raise ConfigError(f"expected a timeout in seconds in (0, 3600], got {timeout!r}")
    keys = [_key(p, t, timeout, limits) for p, t in jobs]
    todo: dict[str, tuple[str, TaskTests]] = {}
    with _CACHE_LOCK:
        for k, (p, t) in zip(keys, jobs, strict=True):
            if k not in _CACHE:
                todo.setdefault(k, (p, t))
    if todo:
        # Default one worker per core: each worker, its test process and its jobs share one core
        # (pinned), so a call is a switch on that core; measured on 2 cores (benchmarks/RESULTS.md),
        # 2 workers made 178-195 checks/s and 4 workers 141-164.
        n = max(1, min(workers or min(os.cpu_count() or 1, 32), len(todo)))
        with ThreadPoolExecutor(n) as ex:
            results = list(ex.map(lambda pt: _run_retrying(pt[0], pt[1], timeout, limits), todo.values()))
        with _CACHE_LOCK:
            for k, r in zip(todo, results, strict=True):
                if r.error_type != "SandboxError":
                    _CACHE[k] = r
                    _CACHE.move_to_end(k)
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        fresh = dict(zip(todo, results, strict=True))
    else:
        fresh = {}
    with _CACHE_LOCK:
        return [fresh.get(k) or _CACHE[k] for k in keys]


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
