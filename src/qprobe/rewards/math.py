"""Final-answer rewards for maths word problems (GSM8K's `#### N` convention)."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from qprobe.core.types import Prompt, RewardResult
from qprobe.errors import ConfigError
from qprobe.rewards.base import Reward
from qprobe.rewards.code import build_program, results_from

# A number, optionally negative, with thousands commas and a $ sign (both ignored) and decimals.
NUMBER_REGEX = r"-?\$?\s?\d[\d,]*(?:\.\d+)?"
# The answer after the last '####' if there is one, else the last number in the text.
ANSWER_REGEX = r"####\s*(" + NUMBER_REGEX + r")"
_NUMBER = re.compile(NUMBER_REGEX)
_ANSWER = re.compile(ANSWER_REGEX)


def parse_number(text: str) -> Fraction | None:
    """'$1,234.50' -> Fraction(2469, 2); None if it is not a number."""
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text: str) -> str | None:
    """The final number of a solution: after the last '####', else the last number; None if none."""
    marked = _ANSWER.findall(text)
    found = marked or _NUMBER.findall(text)
    if not found:
        return None
    value = parse_number(found[-1])
    return None if value is None else _fmt(value)


def _fmt(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else str(float(value))


def _reference(prompt: Prompt) -> Fraction:
    ref = parse_number(str(prompt.meta.get("answer", "")))
    if ref is None:
        raise ConfigError(f"expected prompt.meta['answer'] to be a number for '{prompt.id}', got {prompt.meta.get('answer')!r}")
    return ref


class AnswerMatchReward(Reward):
    """1.0 when `extract_answer(completion)` equals `prompt.meta["answer"]` (exact, as fractions)."""

    def score(self, prompt: Prompt, completions: list[str]) -> list[RewardResult]:
        ref = _reference(prompt)
        out = []
        for c in completions:
            got = extract_answer(c)
            if got is None:
                out.append(RewardResult(0.0, {"status": "error", "error_type": "NoAnswer", "extracted": None}))
                continue
            ok = parse_number(got) == ref
            out.append(RewardResult(float(ok), {"status": "passed" if ok else "failed", "extracted": got,
                                                "expected": _fmt(ref)}))
        return out

    def manifest(self) -> dict[str, Any]:
        return {"reward": "answer-match", "answer_regex": ANSWER_REGEX, "number_regex": NUMBER_REGEX,
                "rule": "number after the last '####', else the last number; commas and $ ignored; exact match"}


class ProgramAnswerReward(Reward):
    """1.0 when the completion's `solution()`, run in the sandbox, returns the reference number."""

    executes_code = True

    def __init__(self, timeout: float | str = 3.0, workers: int | str | None = None) -> None:
        self.timeout = float(timeout)
        self.workers = None if workers in (None, "") else int(workers)  # type: ignore[arg-type]

    def score(self, prompt: Prompt, completions: list[str]) -> list[RewardResult]:
        from qprobe import sandbox

        sandbox.require_opt_in()
        ref = _reference(prompt)
        tests = (f"_value = solution()\n"
                 f"assert abs(float(_value) - {float(ref)!r}) <= 1e-6 * max(1.0, abs({float(ref)!r})), _value\n")
        trusted = sandbox.TaskTests(tests, entry_points=("solution",))  # judged in the test process
        pairs = [(build_program(prompt, c), trusted) for c in completions]
        return results_from(sandbox.check_many(pairs, timeout=self.timeout, workers=self.workers))

    def manifest(self) -> dict[str, Any]:
        return {"reward": "program-answer", "timeout": self.timeout,
                "rule": "float(solution()) within 1e-6 (relative) of the reference"}
