"""Loading llama-cpp-python: lazily, once, and safely on CPUs whose AMX kernels fault.

`load()` imports `llama_cpp` (a one-line error naming `pip install 'qprobe[llamacpp]'` when it
is missing), installs qprobe's log callback and initialises its back-end once. The callback
prints llama.cpp's errors only, unless `set_verbose(True)` or QPROBE_VERBOSE=1 (`qprobe
--verbose`): llama-cpp-python's own callback maps ggml's levels wrongly (ggml.h: 1 debug, 2 info,
3 warn, 4 error; it reads 3 as error), so every model load printed internal warnings such as
"control-looking token" and "pooling_type" to a user who asked for nothing verbose.
`extra_buffers_default()` decides whether models may use ggml's extra CPU buffer types; `disable_extra_buffers()` applies that decision
to llama-cpp-python's own `Llama(...)` class and server too.
"""

from __future__ import annotations

import os
from typing import Any

from qprobe.core.verbosity import set_verbose, verbose
from qprobe.errors import require

__all__ = ["default_threads", "disable_extra_buffers", "extra_buffers_default", "keep_line", "load", "set_verbose"]

_BACKEND_READY = False
GGML_LOG_ERROR, GGML_LOG_CONT = 4, 5  # ggml.h enum ggml_log_level
_LOG = {"callback": None, "printing": False}  # the ctypes callback must outlive every model


def keep_line(level: int, printing: bool) -> bool:
    """Whether a log piece of `level` is printed (CONT continues the previous piece's choice)."""
    if level == GGML_LOG_CONT:
        return printing
    return verbose() or level >= GGML_LOG_ERROR


def _install_log(llama_cpp: Any) -> None:
    import ctypes
    import sys

    import llama_cpp._logger  # noqa: F401  (its import installs its own callback: replaced below)

    @llama_cpp.llama_log_callback  # type: ignore[misc]
    def callback(level: int, text: bytes, user_data: Any) -> None:
        _LOG["printing"] = keep_line(int(level), bool(_LOG["printing"]))
        if _LOG["printing"]:
            print(text.decode("utf-8", errors="replace"), end="", flush=True, file=sys.stderr)

    _LOG["callback"] = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def load() -> Any:
    """The `llama_cpp` module, its back-end initialised."""
    global _BACKEND_READY
    llama_cpp = require("llama_cpp", "llamacpp")
    if not _BACKEND_READY:
        _install_log(llama_cpp)
        llama_cpp.llama_backend_init()
        _BACKEND_READY = True
    return llama_cpp


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_tile" in line for line in f)
    except OSError:
        return False


def extra_buffers_default() -> bool:
    """Whether to let llama.cpp use its extra CPU buffer types (AMX, repacked weights).

    On CPUs that advertise AMX, ggml's AMX matmul faults (SIGSEGV at `ldtilecfg`) under
    some hypervisors even though the kernel grants the permission (seen on this project's
    Firecracker VMs), so they are off there unless QPROBE_LLAMA_EXTRA_BUFFERS=1.
    """
    env = os.environ.get("QPROBE_LLAMA_EXTRA_BUFFERS")
    if env is not None:
        return env.strip().lower() in ("1", "true", "yes", "on")
    return not _cpu_has_amx()


def disable_extra_buffers() -> None:
    """Make llama-cpp-python's own `Llama(...)` (and its server) load models without extra
    buffer types, when `extra_buffers_default()` says so. Call before creating a `Llama`."""
    lib = load()
    if extra_buffers_default():
        return
    import llama_cpp.llama_cpp as low

    original = low.llama_model_default_params
    if getattr(original, "_qprobe_patched", False):
        return

    def patched() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    patched._qprobe_patched = True  # type: ignore[attr-defined]
    low.llama_model_default_params = patched
    lib.llama_model_default_params = patched


def default_threads() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)
