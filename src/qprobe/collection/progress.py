"""A progress bar for collection (samples/s and tokens/s) and other loops over items (rich), or nothing."""

from __future__ import annotations

import time
from typing import Any


class CollectProgress:
    def __init__(self, total: int, done: int, enabled: bool = True, label: str = "collect",
                 unit: str = "samples") -> None:
        self.total, self.done, self.enabled = total, done, enabled
        self.label, self.unit = label, unit
        self.tokens = 0
        self.samples = 0
        self.start = time.perf_counter()
        self._progress: Any = None

    def __enter__(self) -> CollectProgress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn(self.label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(), transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.label, total=self.total, completed=self.done, rate="")
        return self

    def advance(self, samples: int, tokens: int, seconds: float) -> None:
        self.samples += samples
        self.tokens += tokens
        if self._progress is not None:
            el = max(time.perf_counter() - self.start, 1e-9)
            rate = f"{self.samples / el:.2f} {self.unit}/s {self.tokens / el:.1f} tok/s"
            self._progress.update(self._task, advance=samples, rate=rate)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
