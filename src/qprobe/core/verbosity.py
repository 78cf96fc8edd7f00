"""Whether the model libraries may print their own log: `qprobe --verbose`, QPROBE_VERBOSE=1, or
`set_verbose(True)`. By default a user who asked for nothing verbose sees qprobe's own lines and
the libraries' errors only (llama.cpp's load-time warnings and transformers' progress bars are
dropped: `qprobe.generation.llamacpp_lib`, `quiet_transformers`)."""

from __future__ import annotations

import os

_VERBOSE: bool | None = None  # None: QPROBE_VERBOSE decides


def verbose() -> bool:
    if _VERBOSE is not None:
        return _VERBOSE
    return os.environ.get("QPROBE_VERBOSE", "").strip().lower() in ("1", "true", "yes", "on")


def set_verbose(flag: bool | None) -> None:
    """Print the libraries' whole log (True), their errors only (False), or as QPROBE_VERBOSE says (None)."""
    global _VERBOSE
    _VERBOSE = flag


def quiet_transformers() -> None:
    """Unless verbose: no "Loading weights" progress bars nor info/warning lines from transformers
    (and sentence-transformers, which loads through it). Call before loading a model."""
    if verbose():
        return
    try:
        from transformers.utils import logging as tf_logging
    except ImportError:  # transformers not installed: nothing to quiet
        return
    tf_logging.disable_progress_bar()
    tf_logging.set_verbosity_error()
