"""The exception tree. Every error a user can cause is a `QProbeError`.

Messages say what was expected, what was received and how to fix it; the CLI prints
them as one line and exits with code 2.
"""

from __future__ import annotations


class QProbeError(Exception):
    """Base of every error qprobe raises on purpose."""


class ConfigError(QProbeError, ValueError):
    """An option or a configuration value is invalid."""


class UnknownNameError(QProbeError, KeyError):
    """A name looked up in a registry (task, back-end, reward, loss) does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataError(QProbeError):
    """Input data (a dataset file, a pairs file) is missing or malformed."""


class StoreError(QProbeError):
    """A run directory is missing, corrupt, or incompatible with the request."""


class SpecMismatchError(QProbeError):
    """Features were produced under a different spec than the one a probe was trained on."""


class NotFittedError(QProbeError, AttributeError):
    """An estimator was used before `fit`."""


class BackendError(QProbeError):
    """A generation or embedding back-end failed or is not installed."""


class CodeExecutionNotAllowed(QProbeError):
    """Model-written code would run, but the user has not opted in."""


class UnconfinedSandbox(CodeExecutionNotAllowed):
    """The sandbox here is below net + pid + mount isolation, and the second opt-in is missing."""


class SandboxError(QProbeError):
    """The sandbox could not start (its worker failed to set up or died before answering)."""


class MissingDependencyError(QProbeError, ImportError):
    """An optional extra is needed for this feature but is not installed."""


def require(module: str, extra: str):
    """Import an optional dependency or raise a one-line error naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"this feature needs the Python package '{module.split('.')[0]}', which is not "
            f"installed ({exc}); install it with: pip install 'qprobe[{extra}]'"
        ) from exc
