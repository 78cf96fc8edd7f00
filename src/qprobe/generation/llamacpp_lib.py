"""Loading llama-cpp-python: lazily, once, and safely on CPUs whose AMX kernels fault.

`load()` imports `llama_cpp` (a one-line error naming `pip install 'qprobe[llamacpp]'` when it
is missing) and initialises its back-end once. `extra_buffers_default()` decides whether
models may use ggml's extra CPU buffer types; `disable_extra_buffers()` applies that decision
to llama-cpp-python's own `Llama(...)` class and server too.
"""

from __future__ import annotations

import os
from typing import Any

from qprobe.errors import require

_BACKEND_READY = False


def load() -> Any:
    """The `llama_cpp` module, its back-end initialised."""
    global _BACKEND_READY
    llama_cpp = require("llama_cpp", "llamacpp")
    if not _BACKEND_READY:
        import llama_cpp._logger  # noqa: F401  (installs the log callback that honours verbosity)

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
