"""The test process T of a sandboxed job: trusted task code judging copies of the program's values.

T never executes model-written code and never unpickles. Names the tests use resolve, in this order:
the task's trusted setup (e.g. HumanEval's `poly`), T's own builtins, then the program's names
(entry points declared by the task win over both). A program name bound to a stdlib module is
imported by T itself; plain data comes as a copy; anything else is a `Remote` handle. On a handle,
attribute access, calls, iteration, len/bool/str/repr/int/float/index and item access are requests
to the program's process B whose answers are again copies or handles; `==` is identity of
handles, and ordering is not defined, so no method of the program ever decides a comparison with
a value the tests hold. After a call, the state of the list/dict/set/bytearray arguments in B is
copied back into T's objects (in-place mutation, as the tests see it in one process). An
exception raised in B comes back as the builtin exception of that name when it is an Exception
subclass in builtins, else as an Exception subclass of that name; a BaseException (SystemExit,
...) in B, B's death or garbage on the socket makes the verdict an error, whatever the tests do.

Standard library only; loaded by path by `_sandbox_worker.py`.
"""

from __future__ import annotations

import ast
import builtins
import collections
import importlib
import sys
from typing import Any, cast

import _sandbox_codec as codec

# stdlib modules whose import has visible side effects, or that T never needs
_NO_IMPORT = {"antigravity", "this", "__hello__", "__phello__", "idlelib", "turtle", "turtledemo", "tkinter",
              "webbrowser", "pydoc", "pdb", "code", "site"}


class ProgramGone(BaseException):  # noqa: N818  (not an Exception: `except Exception` in a test cannot hide it)
    """B exited, crashed, raised a BaseException or broke the protocol."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class ProgramError(Exception):
    """Base of the exceptions standing for exception types the program defined."""


_ERROR_TYPES: dict[str, type] = {}
_BUILTIN_NAMES = frozenset(dir(builtins))


def _exception(name: str, msg: str, args) -> BaseException:
    cls = getattr(builtins, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        safe = name if name.isidentifier() and len(name) <= 100 else "ProgramError"
        cls = _ERROR_TYPES.get(safe) or type(safe, (ProgramError,), {})
        if len(_ERROR_TYPES) < 1000:  # T lives on: the program's names must not grow it without bound
            _ERROR_TYPES[safe] = cls
    for attempt in (args, (msg,)):
        if isinstance(attempt, tuple):
            try:
                return cls(*attempt)
            except Exception:  # noqa: BLE001  e.g. UnicodeDecodeError wants 5 arguments
                continue
    return ProgramError(msg)


class _Channel:
    """T's end of the socket to B: one request, one reply."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.gone: ProgramGone | None = None
        self.handles: dict[int, Remote] = {}

    def handle(self, hid: int, type_name: str) -> Remote:
        h = self.handles.get(hid)
        if h is None:
            h = self.handles[hid] = Remote(hid, type_name)
        return h

    def encode(self, value):
        def ref(obj):
            if isinstance(obj, Remote):
                return ["h", obj._qp_id, ""]
            raise codec.UncopyableValue(f"the tests cannot pass a {type(obj).__name__} to the program")

        return codec.encode(value, ref)

    def decode(self, value):
        try:
            return codec.decode(value, self.handle)
        except (codec.UncopyableValue, RecursionError, MemoryError) as exc:
            raise self._lost("ReportTampered", f"the program sent a value that is not a valid copy: {exc}") from None

    def _lost(self, kind: str, message: str) -> ProgramGone:
        if self.gone is None:
            self.gone = ProgramGone(kind, message[:500])
        return self.gone

    def raw(self, req: list) -> list:
        if self.gone is not None:
            raise self.gone
        try:
            codec.send(self.fd, req)
        except OSError:
            pass  # B hung up; what it sent before is still there to read
        try:
            rep = codec.recv(self.fd)
        except OSError:
            rep = None
        except (codec.UncopyableValue, RecursionError, MemoryError) as exc:
            raise self._lost("ReportTampered", f"the program broke the protocol: {exc}") from None
        if rep is None:
            raise self._lost("EarlyExit", "the program exited before its tests finished")
        return self.check(rep)

    def check(self, rep) -> list:
        """`rep` if it is an answer; raises what it stands for if it is an exception."""
        if type(rep) is not list or not rep or rep[0] not in ("ok", "exc", "base", "perr"):
            raise self._lost("ReportTampered", "the program sent something that is not an answer")
        if rep[0] == "base":
            raise self._lost(str(rep[1])[:100] if len(rep) > 1 else "BaseException",
                             str(rep[2]) if len(rep) > 2 else "")
        if rep[0] == "exc":
            name = str(rep[1]) if len(rep) > 1 else "Exception"
            args = self.decode(rep[3]) if len(rep) > 3 and rep[3] is not None else None
            raise _exception(name, str(rep[2])[:500] if len(rep) > 2 else "", args)
        return rep

    def value(self, op: str, h: Remote, *extra):
        rep = self.raw([op, h._qp_id, *extra])
        return self.decode(rep[1]) if len(rep) > 1 else None

    def call(self, h: Remote, args: tuple, kwargs: dict):
        rep = self.raw(["call", h._qp_id, [self.encode(a) for a in args],
                        [[k, self.encode(v)] for k, v in kwargs.items()]])
        if len(rep) < 3 or type(rep[2]) is not list:
            raise self._lost("ReportTampered", "the program sent something that is not an answer")
        result = self.decode(rep[1])
        for where, state in rep[2]:  # in-place mutation of the arguments, as B saw it
            orig: Any = args[where] if type(where) is int and 0 <= where < len(args) else kwargs.get(where) \
                if type(where) is str else None
            new = self.decode(state)
            if type(orig) is not type(new) or type(orig) not in (list, dict, set, bytearray):
                continue
            if isinstance(orig, (list, bytearray)):
                orig[:] = new
            else:
                orig.clear()
                orig.update(new)
        return result


_CHANNEL: _Channel | None = None


def _chan() -> _Channel:
    """The job's channel. Between jobs it is None, and a handle used then fails as before (AttributeError)."""
    return cast(_Channel, _CHANNEL)


def _typed(value, kind: type, what: str):
    if type(value) is not kind:
        raise TypeError(f"{what} returned {type(value).__name__}, expected {kind.__name__}")
    return value


class Remote:
    """An object that stayed in the program's process."""

    __slots__ = ("_qp_id", "_qp_type", "_qp_buf", "_qp_n", "__weakref__")

    def __init__(self, hid: int, type_name: str) -> None:
        object.__setattr__(self, "_qp_id", hid)
        object.__setattr__(self, "_qp_type", type_name)
        object.__setattr__(self, "_qp_buf", collections.deque())
        object.__setattr__(self, "_qp_n", 1)

    def __call__(self, *args, **kwargs):
        return _chan().call(self, args, kwargs)

    def __getattr__(self, name: str):
        return _chan().value("getattr", self, name)

    def __setattr__(self, name: str, value) -> None:
        _chan().value("setattr", self, name, _chan().encode(value))

    def __getitem__(self, key):
        return _chan().value("getitem", self, _chan().encode(key))

    def __setitem__(self, key, value) -> None:
        _chan().value("setitem", self, _chan().encode(key), _chan().encode(value))

    def __delitem__(self, key) -> None:
        _chan().value("delitem", self, _chan().encode(key))

    def __iter__(self):
        it = _chan().value("iter", self)
        if not isinstance(it, Remote):
            raise TypeError(f"iter() of a {self._qp_type} returned a non-iterator")
        return it

    def __next__(self):
        buf = self._qp_buf
        if not buf:  # fetch 1, 2, 4, ... items at a time: list(gen) is fast, next(gen) takes one
            n = self._qp_n
            object.__setattr__(self, "_qp_n", min(2 * n, 1024))
            rep = _chan().raw(["next", self._qp_id, n])
            items = _chan().decode(rep[1]) if len(rep) > 2 else None
            if type(items) is not list:
                raise _chan()._lost("ReportTampered", "the program sent something that is not an answer")
            buf.extend(("v", v) for v in items)
            end = rep[2]
            if end is not None:
                if type(end) is not list or len(end) != 4 or end[0] not in ("exc", "base"):
                    raise _chan()._lost("ReportTampered", "the program sent something that is not an answer")
                buf.append(("e", end))
        kind, v = buf[0]
        if kind == "v":
            buf.popleft()
            return v
        if str(v[1]) != "StopIteration":  # an exhausted iterator stays exhausted; other errors come once
            buf.popleft()
        return _chan().check(v)  # raises

    def __len__(self) -> int:
        n = _typed(_chan().value("len", self), int, "len()")
        if n < 0:
            raise ValueError("__len__() should return >= 0")
        return n

    def __bool__(self) -> bool:
        return _typed(_chan().value("bool", self), bool, "bool()")

    def __str__(self) -> str:
        return _typed(_chan().value("str", self), str, "str()")

    def __repr__(self) -> str:
        return _typed(_chan().value("repr", self), str, "repr()")

    def __format__(self, spec: str) -> str:
        return _typed(_chan().value("format", self, spec), str, "format()")

    def __float__(self) -> float:
        return _typed(_chan().value("float", self), float, "float()")

    def __int__(self) -> int:
        return _typed(_chan().value("int", self), int, "int()")

    def __index__(self) -> int:
        return _typed(_chan().value("index", self), int, "index()")

    def __eq__(self, other) -> bool:  # identity of handles: the program's __eq__ never judges
        return self is other

    def __ne__(self, other) -> bool:
        return self is not other

    __hash__ = object.__hash__


def _names(*trees: ast.AST) -> list[str]:
    return sorted({n.id for t in trees for n in ast.walk(t) if isinstance(n, ast.Name)})


def _module(name: str, fallback: Remote):
    top = name.split(".")[0]
    if top in sys.stdlib_module_names and top not in _NO_IMPORT:
        try:
            return importlib.import_module(name)
        except Exception:  # noqa: BLE001
            pass
    return fallback  # not a stdlib module: the program's own, reached remotely


def _failure(exc: BaseException, where: str, filename: str, source: str) -> dict:
    if isinstance(exc, ProgramGone):
        return {"outcome": "error", "error_type": exc.kind, "message": str(exc)[:500], "where": where,
                "line": fail_line(exc.__traceback__, filename, source), "program_gone": True}
    return {"outcome": "failed" if isinstance(exc, AssertionError) else "error", "where": where,
            "error_type": type(exc).__name__[:200], "message": str(exc)[:500],
            "line": fail_line(exc.__traceback__, filename, source)}


def fail_line(tb, filename: str, source: str) -> str:
    """The source line of the innermost traceback frame in `filename`."""
    line = ""
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            lines = source.splitlines()
            if 0 < tb.tb_lineno <= len(lines):
                line = lines[tb.tb_lineno - 1].strip()
        tb = tb.tb_next
    return line[:500]


def run_tests(job: dict, fd: int) -> dict:
    """One job in T: compile the trusted code, bind names, run setup then tests; the report."""
    global _CHANNEL
    tests, setup = job["tests"], job.get("setup") or ""
    entry_points = set(job.get("entry_points") or ())
    try:
        t_setup, t_tests = ast.parse(setup, "<setup>"), ast.parse(tests, "<tests>")
        c_setup, c_tests = compile(t_setup, "<setup>", "exec"), compile(t_tests, "<tests>", "exec")
    except BaseException as exc:  # noqa: BLE001
        return {**_failure(exc, "compile", "<tests>", tests), "outcome": "error"}
    _CHANNEL = chan = _Channel(fd)
    g: dict = {"__name__": "__tests__", "__builtins__": builtins}
    try:
        exec(c_setup, g)
    except BaseException as exc:  # noqa: BLE001
        return {**_failure(exc, "setup", "<setup>", setup), "outcome": "error"}
    trusted = set(g) | _BUILTIN_NAMES
    try:
        rep = chan.raw(["names", _names(t_setup, t_tests)])
        if rep[0] == "perr":  # the program itself raised (or did not compile)
            return {"outcome": "failed" if rep[1] == "AssertionError" else "error", "where": "program",
                    "error_type": str(rep[1])[:200], "message": str(rep[2])[:500],
                    "line": str(rep[3])[:500] if len(rep) > 3 else ""}
        entries = rep[1] if len(rep) > 1 and type(rep[1]) is list else None
        if entries is None:
            raise chan._lost("ReportTampered", "the program sent something that is not an answer")
        for entry in entries:
            if type(entry) is not list or len(entry) < 3 or type(entry[0]) is not str:
                raise chan._lost("ReportTampered", "the program sent something that is not an answer")
            name = entry[0]
            if name in trusted and name not in entry_points:
                continue  # the task's helpers and T's builtins are never the program's
            if entry[1] == "m" and len(entry) == 4 and type(entry[2]) is str:
                # `import json` binds json to json; under any other name (`import pickle as json`)
                # the module stays the program's, reached remotely.
                g[name] = _module(entry[2], chan.decode(entry[3])) if entry[2] == name else chan.decode(entry[3])
            else:
                g[name] = chan.decode(entry[2])
    except BaseException as exc:  # noqa: BLE001
        return _failure(exc, "program", "<tests>", tests)
    try:
        exec(c_tests, g)
    except BaseException as exc:  # noqa: BLE001
        return _failure(exc, "tests", "<tests>", tests)
    finally:
        _CHANNEL = None
    if chan.gone is not None:  # a test caught it: still not a pass
        return _failure(chan.gone, "tests", "<tests>", tests)
    return {"outcome": "passed"}
