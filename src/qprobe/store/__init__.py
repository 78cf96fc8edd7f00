"""The run store: what `collect` writes and everything else reads."""

from qprobe.store.run import Run, RunWriter

__all__ = ["Run", "RunWriter"]
