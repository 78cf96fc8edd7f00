"""Power of `qprobe demo` designs, computed from the committed reproduction runs (issue 20).

    python benchmarks/demo_power.py [--probe default-code] [--rates 50 90] [--minutes 15] [--designs 8x2 8x4 ...]

For each design (task, n samples a problem, k), the probe's per-problem gain over pass@1 (argmax
best-of-k among the problem's first n stored samples, exact expected reward) on every problem of
the committed run gives a mean and a spread; a demo of N problems then has a paired 95% interval
that excludes 0 with probability about Phi(mean / (sd / sqrt(N)) - 1.96). N is what the generation
budget buys at a given collect speed (tokens/s, model load taken off), from the run's own tokens a
problem. The committed runs are test data: this chooses a design's size, never its problems.
`power_by_problems` gives the same probability for each N of `--problems` (to fix the demo's N once
the collect speed is measured: `qprobe.evaluation.demo`'s docstring has the rule).
Prints a table and writes benchmarks/results/demo_power.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from qprobe.evaluation.evaluate import RunData, mean_reward_values, probe_values
from qprobe.probes import Probe

LOAD_SECONDS = 60


def phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def first_n(data: RunData, n: int) -> RunData:
    seeds = data.run.table(["seed"]).column("seed").to_numpy()[data.rows]
    rows: dict[str, list[int]] = {}
    for i, p in enumerate(data.prompt_ids):
        rows.setdefault(p, []).append(i)
    keep = np.array(sorted(i for idx in rows.values() for i in sorted(idx, key=lambda j: seeds[j])[:n]))
    return RunData(data.run, data.rows[keep], data.prompt_ids[keep], data.rewards[keep])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--probe", default="default-code")
    ap.add_argument("--runs", default="runs/repro", type=Path)
    ap.add_argument("--rates", type=float, nargs="+", default=[50.0, 90.0],
                    help="collect speeds, tokens/s (today's per-prompt collect; the decode limit)")
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--problems", type=int, nargs="+", default=[20, 25, 30, 35, 40, 45, 50, 60],
                    help="numbers of problems N to give the probability for")
    ap.add_argument("--designs", nargs="+", default=["8x4", "8x8", "16x4", "16x8", "4x2", "4x4", "8x2", "8x3", "6x3"],
                    help="n x k: samples a problem x candidates the probe picks from")
    ap.add_argument("--out", default="benchmarks/results/demo_power.json", type=Path)
    args = ap.parse_args(argv)
    probe = Probe.from_pretrained(args.probe)
    rows = []
    for task in ("humaneval", "mbpp-test"):
        full = RunData.load(args.runs / task)
        for n, k in (tuple(int(v) for v in d.split("x")) for d in args.designs):
            data = first_n(full, n)
            n_tokens = data.run.table(["n_tokens"]).column("n_tokens").to_numpy()[data.rows]
            base = mean_reward_values(data)
            got = probe_values(data, probe.score(data.features("L18_mean")), k, 0.0)
            gain = np.array([got[p] - base[p] for p in base])
            mu, sd = float(gain.mean()), float(gain.std(ddof=1))
            per_problem = float(n_tokens.sum() / len(base))
            row = {"task": task, "n": n, "k": k, "problems_measured": len(base), "gain": mu, "sd": sd,
                   "tokens_per_problem": per_problem, "power": {},
                   "power_by_problems": {str(m): phi(mu / (sd / math.sqrt(m)) - 1.96) for m in args.problems}}
            for rate in args.rates:
                n_problems = int((args.minutes * 60 - LOAD_SECONDS) * rate // per_problem)
                row["power"][str(rate)] = {"problems": n_problems,
                                           "p_ci_above_0": phi(mu / (sd / math.sqrt(n_problems)) - 1.96)}
            rows.append(row)
    head = f"{'task':<10} {'n':>2} {'k':>2} {'gain':>7} {'sd':>6} {'tok/problem':>11}" + "".join(
        f"  {f'N@{r:g}tok/s':>11} {'P':>5}" for r in args.rates)
    print(head)
    for r in rows:
        line = f"{r['task']:<10} {r['n']:>2} {r['k']:>2} {r['gain']:+7.4f} {r['sd']:6.3f} {r['tokens_per_problem']:11.0f}"
        for rate in args.rates:
            p = r["power"][str(rate)]
            line += f"  {p['problems']:>11} {p['p_ci_above_0']:5.2f}"
        print(line)
    label = "P(CI > 0) at N ="
    print(f"\n{'task':<10} {'n':>2} {'k':>2}  {label}" + "".join(f" {m:>5}" for m in args.problems))
    for r in rows:
        print(f"{r['task']:<10} {r['n']:>2} {r['k']:>2}  {'':<{len(label)}}"
              + "".join(f" {r['power_by_problems'][str(m)]:5.2f}" for m in args.problems))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/demo_power.py", *(sys.argv[1:] if argv is None else argv)])
    meta = {"command": command, "probe": args.probe, "minutes": args.minutes,
            "load_seconds": LOAD_SECONDS, "rates": args.rates, "problems": args.problems}
    args.out.write_text(json.dumps({**meta, "designs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
