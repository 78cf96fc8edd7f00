"""The sandbox's value copies: a tagged JSON encoding (no pickle) and length-prefixed framing.

Standard library only (loaded by path in the worker, like `_sandbox_confine.py`). Values cross
between the program's process B and the test process T as copies. `encode` runs on either side;
`decode` is what T applies to B's bytes, so it is strict: it only ever builds exact builtin values
(plus `fractions.Fraction`, `decimal.Decimal` and the caller's opaque handles), refuses anything
else, and caps size and depth. Whatever bytes B sends, T holds plain data afterwards.

Scalars are JSON's own (None, bool, small int, float including NaN/Infinity/-0.0, str); everything
else is a list whose first item is a tag:
  ["I", hex] big int | ["c", re, im] | ["y", b64] bytes | ["Y", b64] bytearray | ["l", ...] list
  ["t", ...] tuple | ["s", ...] set | ["f", ...] frozenset | ["d", k1, v1, ...] dict
  ["r", start, stop, step] range | ["Q", num, den] Fraction | ["D", str] Decimal
  ["B", name] a builtin type (the receiver's own; builtin functions are not sent back) |
  ["h", id, type name] a handle (an object that stays in B; only B's encoder makes these).
"""

from __future__ import annotations

import binascii
import builtins
import json
import os
import struct
from typing import Any, cast

MAX_MESSAGE = 64 << 20  # bytes in one frame
MAX_DEPTH = 200  # nesting of containers
MAX_ITEMS = 8_000_000  # scalars + containers in one value
_SMALL = 1 << 62


class UncopyableValue(ValueError):
    """A value that cannot be copied, or bytes that are not a valid copy."""


# ------------------------------------------------------------------ encode (either side)

_SEQ: tuple[tuple[Any, str], ...] = ((list, "l"), (tuple, "t"), (set, "s"), (frozenset, "f"))


def encode(x, ref, depth: int = 0, budget: list | None = None):
    """`x` as JSON-able data; objects that are not plain data go through `ref(obj)` (a handle),
    which may raise UncopyableValue (T refuses to send its own objects)."""
    if budget is None:
        budget = [MAX_ITEMS]
    budget[0] -= 1
    if budget[0] < 0:
        raise UncopyableValue(f"value too large to copy (over {MAX_ITEMS} items)")
    if depth > MAX_DEPTH:
        raise UncopyableValue(f"value nested too deep to copy (over {MAX_DEPTH} levels)")
    t = type(x)
    if x is None or t is bool or t is str or t is float:
        return x
    if t is int:
        return x if -_SMALL < x < _SMALL else ["I", format(x, "x")]
    if t is list or t is tuple or t is set or t is frozenset:
        tag = "l" if t is list else "t" if t is tuple else "s" if t is set else "f"
        return [tag, *(encode(e, ref, depth + 1, budget) for e in x)]
    if t is dict:
        out = ["d"]
        for k, v in dict.items(x):
            out.append(encode(k, ref, depth + 1, budget))
            out.append(encode(v, ref, depth + 1, budget))
        return out
    if t is bytes or t is bytearray:
        return ["y" if t is bytes else "Y", binascii.b2a_base64(bytes(x), newline=False).decode("ascii")]
    if t is complex:
        return ["c", x.real, x.imag]
    if t is range:
        return ["r", encode(x.start, ref), encode(x.stop, ref), encode(x.step, ref)]
    mod, name = getattr(t, "__module__", ""), getattr(t, "__qualname__", "")
    if mod == "fractions" and name == "Fraction":
        return ["Q", encode(int(x.numerator), ref), encode(int(x.denominator), ref)]
    if mod == "decimal" and name == "Decimal":
        return ["D", str(x)]
    if t is type and getattr(builtins, getattr(x, "__name__", ""), None) is x:
        return ["B", cast(type, x).__name__]  # a builtin type (e.g. `remove_datatype(t, int)`)
    # Subclasses of builtins travel as their base value: their own methods never reach T.
    if isinstance(x, int):
        return encode(int.__int__(x), ref, depth, budget)
    if isinstance(x, float):
        return float.__float__(x)
    if isinstance(x, str):
        return str.__getitem__(x, slice(None))
    if isinstance(x, (bytes, bytearray)):
        return encode(bytes(x) if isinstance(x, bytes) else bytearray(x), ref, depth, budget)
    if isinstance(x, dict):
        return encode(dict(dict.items(x)), ref, depth, budget)
    for base, _tag in _SEQ:
        if isinstance(x, base):
            return encode(base(base.__iter__(x)), ref, depth, budget)
    if isinstance(x, complex):
        return ["c", x.real, x.imag]
    if mod == "numpy" and getattr(x, "shape", None) == () and hasattr(x, "item"):
        return encode(x.item(), ref, depth, budget)  # a numpy scalar: its Python value
    return ref(x)


# ------------------------------------------------------------------ decode (T, on B's bytes)


def _int(v):
    if type(v) is int:
        return v
    if type(v) is list and len(v) == 2 and v[0] == "I" and type(v[1]) is str and len(v[1]) < (MAX_MESSAGE >> 1):
        try:
            return int(v[1], 16)
        except ValueError:
            pass
    raise UncopyableValue("expected an integer")


def _num(v):
    if type(v) in (int, float):
        return v
    raise UncopyableValue("expected a number")


def _set(items: list, frozen: bool):
    """A set (frozenset) of `items` that iterates in their order where one of the ways CPython
    builds sets gives it (a literal `{...}` and `set(list)` size their tables differently), so
    `tuple(s)` reads the same on both sides."""
    if frozen:
        return frozenset(items)
    merged: set = set()
    merged.update(frozenset(items))  # what `{1, 2, 3}` (SET_UPDATE of a constant) does
    added = set()
    for x in items:
        added.add(x)
    for s in (set(items), merged, added):
        if len(items) > 4096 or (len(s) == len(items) and all(a is b for a, b in zip(s, items, strict=True))):
            return s
    return set(items)


def decode(v, handle, depth: int = 0, budget: list | None = None):
    """Rebuild a value from `encode`'s output, refusing anything else; `handle(id, type_name)`
    makes the caller's stand-in for an object that stayed in B."""
    if budget is None:
        budget = [MAX_ITEMS]
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DEPTH:
        raise UncopyableValue("value too large or too deep")
    t = type(v)
    if v is None or t is bool or t is int or t is float or t is str:
        return v
    if t is not list or not v or type(v[0]) is not str:
        raise UncopyableValue(f"not a valid copy: {t.__name__}")
    tag, rest = v[0], v[1:]
    try:
        if tag in ("l", "t", "s", "f"):
            items = [decode(e, handle, depth + 1, budget) for e in rest]
            return items if tag == "l" else tuple(items) if tag == "t" else _set(items, tag == "f")
        if tag == "d":
            if len(rest) % 2:
                raise UncopyableValue("a dict needs key/value pairs")
            out = {}
            for i in range(0, len(rest), 2):
                out[decode(rest[i], handle, depth + 1, budget)] = decode(rest[i + 1], handle, depth + 1, budget)
            return out
        if tag == "I" and len(rest) == 1:
            return _int(v)
        if tag in ("y", "Y") and len(rest) == 1 and type(rest[0]) is str:
            data = binascii.a2b_base64(rest[0].encode("ascii"))
            return data if tag == "y" else bytearray(data)
        if tag == "c" and len(rest) == 2:
            return complex(_num(rest[0]), _num(rest[1]))
        if tag == "r" and len(rest) == 3:
            return range(_int(rest[0]), _int(rest[1]), _int(rest[2]))
        if tag == "Q" and len(rest) == 2:
            from fractions import Fraction

            return Fraction(_int(rest[0]), _int(rest[1]))
        if tag == "D" and len(rest) == 1 and type(rest[0]) is str and len(rest[0]) < 10_000:
            from decimal import Decimal

            return Decimal(rest[0])
        if tag == "B" and len(rest) == 1 and type(rest[0]) is str and not rest[0].startswith("_"):
            found = getattr(builtins, rest[0], None)
            if type(found) is type:  # the receiver's own builtin type (never a function such as exec)
                return found
        if tag == "h" and len(rest) == 2 and type(rest[0]) is int and type(rest[1]) is str:
            return handle(rest[0], rest[1][:200])
    except (TypeError, ValueError, ArithmeticError, UnicodeError, binascii.Error) as exc:
        raise UncopyableValue(f"not a valid copy: {exc}") from None
    raise UncopyableValue(f"not a valid copy: tag {tag[:20]!r}")


# ------------------------------------------------------------------ framing


def send(fd: int, obj) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode("utf-8", "surrogatepass")
    if len(data) > MAX_MESSAGE:
        raise UncopyableValue(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    data = struct.pack("<I", len(data)) + data
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv(fd: int):
    """One frame, parsed; None at end of stream. Raises UncopyableValue on bad framing or JSON."""
    head = _read_exact(fd, 4)
    if head is None:
        return None
    (n,) = struct.unpack("<I", head)
    if n > MAX_MESSAGE:
        raise UncopyableValue(f"message of {n} bytes exceeds {MAX_MESSAGE}")
    body = _read_exact(fd, n)
    if body is None:
        return None
    try:
        return json.loads(body.decode("utf-8", "surrogatepass"))
    except (ValueError, RecursionError, UnicodeError) as exc:
        raise UncopyableValue(f"not valid JSON: {str(exc)[:100]}") from None
