"""Unit-test rewards: the program passes all its tests in the sandbox within the timeout."""

from __future__ import annotations

import re
from typing import Any

from qprobe.core.types import Prompt, RewardResult
from qprobe.errors import ConfigError
from qprobe.rewards.base import Reward

# The first fenced block, preferring one labelled python; an unterminated block runs to the end.
_FENCE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)(?:\n[ \t]*```|\Z)", re.DOTALL | re.IGNORECASE)
CODE_EXTRACTION = "first ```python block if any (else first ``` block), else the whole completion"


def extract_code(completion: str) -> str:
    """The code in a completion: the first ```python block if there is one, else the text itself."""
    blocks = _FENCE.findall(completion)
    if not blocks:
        return completion
    for lang, body in blocks:
        if lang:
            return body
    return blocks[0][1]


def build_program(prompt: Prompt, completion: str) -> str:
    """What runs: the prompt's reward prefix + the completion's code (cut at `meta["stop"]`).

    `prompt.meta["fallback_prefix"]` (e.g. a HumanEval signature) is prepended when the code does
    not define `meta["entry_point"]` itself (a chat model that answered with the body only).
    """
    for stop in prompt.meta.get("stop", ()):  # in case the back-end did not stop there itself
        cut = completion.find(stop)
        completion = completion if cut < 0 else completion[:cut]
    code = extract_code(completion) if "```" in completion else completion
    program = prompt.reward_prefix + code
    entry, fallback = prompt.meta.get("entry_point"), prompt.meta.get("fallback_prefix")
    if entry and fallback and not re.search(rf"\bdef\s+{re.escape(entry)}\s*\(", program):
        program = fallback + code
    return program


def trusted_tests(prompt: Prompt, code: str | None = None) -> Any:
    """The sandbox's `TaskTests` for a prompt: `code` (default `meta["tests"]`), the task's trusted
    `meta["setup"]` and its entry points (`meta["entry_points"]`, else `[meta["entry_point"]]`)."""
    from qprobe import sandbox

    meta = prompt.meta
    entries = meta.get("entry_points") or ([meta["entry_point"]] if meta.get("entry_point") else [])
    setup = meta.get("setup") or ""
    if not isinstance(setup, str) or not all(isinstance(e, str) for e in entries):
        raise ConfigError(f"expected prompt.meta['setup'] (Python source) and meta['entry_points'] (names) for "
                          f"prompt '{prompt.id}', got {setup!r} / {entries!r}")
    return sandbox.TaskTests(meta["tests"] if code is None else code, setup=setup, entry_points=tuple(entries))


def results_from(checked: list[Any]) -> list[RewardResult]:
    out = []
    for r in checked:
        reward = None if r.error_type == "SandboxError" else float(r.passed)
        out.append(RewardResult(reward, r.details()))
    return out


class UnitTestReward(Reward):
    """1.0 if `prompt.meta["tests"]` run to the end against `build_program(prompt, completion)`, else 0.0.

    The tests run in the sandbox's test process with the task's `meta["setup"]` and entry points
    (`trusted_tests`); the program runs in its own confined process.

    None (unscored) only when the sandbox itself failed. Details per sample: status
    (passed/failed/timeout/error), error_type, failing_test, message, stderr_tail, duration.
    """

    executes_code = True

    def __init__(self, timeout: float | str = 3.0, workers: int | str | None = None) -> None:
        try:
            self.timeout = float(timeout)
            self.workers = None if workers in (None, "") else int(workers)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ConfigError(f"expected a number for timeout/workers, got {timeout!r}/{workers!r}") from exc
        if not 0 < self.timeout <= 3600:
            raise ConfigError(f"expected a timeout in seconds in (0, 3600], got {self.timeout}")

    def score(self, prompt: Prompt, completions: list[str]) -> list[RewardResult]:
        from qprobe import sandbox

        sandbox.require_opt_in()
        tests = prompt.meta.get("tests")
        if not isinstance(tests, str) or not tests.strip():
            raise ConfigError(f"expected prompt.meta['tests'] (Python source) for prompt '{prompt.id}', got {tests!r}")
        trusted = trusted_tests(prompt)
        pairs = [(build_program(prompt, c), trusted) for c in completions]
        return results_from(sandbox.check_many(pairs, timeout=self.timeout, workers=self.workers))

    def manifest(self) -> dict[str, Any]:
        return {"reward": "unit-tests", "timeout": self.timeout, "code_extraction": CODE_EXTRACTION}
