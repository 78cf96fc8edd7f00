"""Where a continuous-batching collection's wall time goes (issue 21's gap to the decode limit).

One `collect` call (the same as bench_batching.py's continuous run) with timers wrapped around the
llama.cpp back-end's parts: decode steps (split into prompt prefill and sampling steps, with the
number of sequences each step carries), llama.cpp's sampler (`backend.sample`), the stop checks, the state read-back, the pool's own
Python, the rewards (sandbox, in their thread), and the rest (model load, features, store). It then
prices the collection at the decode limit measured in the same run: what the steps would cost at
full occupancy, and what the prompts cost at the prefill rate.

    python benchmarks/profile_collect.py --workload mbpp-chat --prompts 10 --n 8 --slots 32

Writes benchmarks/results/profile_collect.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Timers:
    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self.rows: collections.Counter[int] = collections.Counter()  # sampling-step rows -> count
        self.step_seconds_by_rows: collections.Counter[int] = collections.Counter()

    def wrap(self, owner: object, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[label] += time.perf_counter() - t0
                self.calls[label] += 1

        setattr(owner, name, timed)


def main() -> None:
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_batching as bb

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="mbpp-chat", choices=["mbpp-chat", "humaneval"])
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--slots", type=int, default=32, help="the collection's n_seq_max")
    ap.add_argument("--limit-slots", type=int, nargs="+", default=None,
                    help="S values of the decode limit (default: --slots); the best is the reference")
    ap.add_argument("--steps", type=int, default=48, help="decode-limit steps")
    ap.add_argument("--max-new-tokens", type=int, default=300)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "profile_collect.json")
    args = ap.parse_args()

    import os

    os.environ.setdefault("QPROBE_ALLOW_CODE_EXECUTION", "1")
    from qprobe.catalog import TASKS
    from qprobe.collection import collect as collect_mod
    from qprobe.generation import llamacpp, llamacpp_pool

    work = bb.workloads(args)[args.workload]
    task = TASKS.create(work["task"], **work["task_options"])
    with llamacpp.LlamaCppBackend(n_ctx=256, n_threads=1) as b:
        text = b.render(task.prompts(work["split"])[0])
    limits = [bb.decode_limit(s, text, args) for s in (args.limit_slots or [args.slots])]
    limit = max(limits, key=lambda r: r["tok_per_s"])

    t = Timers()
    B, P = llamacpp.LlamaCppBackend, llamacpp_pool.LlamaCppPool
    orig_decode = B.decode

    def decode(self, items):
        t0 = time.perf_counter()
        try:
            return orig_decode(self, items)
        finally:
            dt = time.perf_counter() - t0
            if any(out for *_, out in items):
                t.seconds["decode: sampling steps"] += dt
                t.rows[len(items)] += 1
                t.step_seconds_by_rows[len(items)] += dt
            else:
                t.seconds["decode: prompt prefill"] += dt
                t.calls["prefill tokens"] += len(items)

    B.decode = decode  # type: ignore[method-assign]
    t.wrap(B, "states", "state read-back")
    t.wrap(B, "__init__", "back-end load")
    t.wrap(P, "step", "pool.step (all of it)")
    t.wrap(B, "sample", "sampler (backend.sample)")
    t.wrap(P, "_advance", "stop checks, text")
    score_seconds = [0.0]
    t.wrap(collect_mod, "_flush", "store writes (+ waiting for rewards)")

    import concurrent.futures as cf

    orig_submit = cf.ThreadPoolExecutor.submit

    def submit(self, fn, *a, **k):
        if not self._thread_name_prefix.startswith("qprobe-reward"):  # e.g. backend.sample's threads
            return orig_submit(self, fn, *a, **k)

        def timed(*a2, **k2):
            t0 = time.perf_counter()
            try:
                return fn(*a2, **k2)
            finally:
                score_seconds[0] += time.perf_counter() - t0

        return orig_submit(self, timed, *a, **k)

    cf.ThreadPoolExecutor.submit = submit  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        res = bb.run_collect(work, Path(tmp) / "run", {"n_seq_max": args.slots}, args)
    res.pop("_texts")
    wall = res["seconds"]
    steps = sum(t.rows.values())
    rows = sum(k * v for k, v in t.rows.items())
    at_limit = rows / limit["tok_per_s"]
    prefill_rate = t.calls["prefill tokens"] / max(t.seconds["decode: prompt prefill"], 1e-9)
    full = {k: round(v, 2) for k, v in t.seconds.items()}
    py = t.seconds["pool.step (all of it)"] - t.seconds["decode: sampling steps"] - t.seconds["state read-back"] - \
        t.seconds["sampler (backend.sample)"] - \
        t.seconds["stop checks, text"] - t.seconds["decode: prompt prefill"]
    report = {
        "args": vars(args) | {"out": str(args.out)},
        "decode_limits": limits,
        "best_decode_limit": limit,
        "collect": res,
        "ratio": round(res["tok_per_s"] / limit["tok_per_s"], 3),
        "ratio_with_prompts": round(res["with_prompts_tok_per_s"] / limit["tok_per_s"], 3),
        "seconds": full,
        "rewards_seconds_in_thread": round(score_seconds[0], 2),
        "sampling_steps": steps,
        "rows_fed_in_sampling_steps": rows,
        "mean_rows_a_step": round(rows / max(steps, 1), 2),
        "rows_histogram": dict(sorted(t.rows.items())),
        "tok_per_s_by_rows": {k: round(k * t.rows[k] / t.step_seconds_by_rows[k], 1) for k in sorted(t.rows)},
        "pool_python_seconds": round(py, 2),
        "rows_at_decode_limit_seconds": round(at_limit, 2),
        "prefill_tok_per_s": round(prefill_rate, 1),
    }
    print(f"{args.workload}: {res['tokens']} tokens in {wall:.1f} s = {res['tok_per_s']} tok/s; "
          f"best decode limit (S={limit['slots']}): {limit['tok_per_s']} tok/s; ratio {report['ratio']}, "
          f"with the {res['prompt_tokens']} prompt tokens {report['ratio_with_prompts']}")
    for k, v in sorted(full.items(), key=lambda kv: -kv[1]):
        print(f"  {k:40s} {v:8.2f} s  ({v / wall:.0%})")
    print(f"  {'rewards (the reward thread, overlapping)':40s} {score_seconds[0]:8.2f} s")
    print(f"  pool Python outside decode/prefill/sampler/read-back: {py:.2f} s")
    print(f"  sampling steps {steps}, {rows} rows, mean {rows / max(steps, 1):.1f} a step (S={args.slots}); "
          f"those rows at the best decode limit: {at_limit:.1f} s")
    print(f"  prefill {t.calls['prefill tokens']} tokens at {prefill_rate:.1f} tok/s")
    print("  tok/s by rows a step:", report["tok_per_s_by_rows"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
