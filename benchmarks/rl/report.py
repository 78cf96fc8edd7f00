"""Learning curves, steps-to-reach and the iterative Q-probing table of benchmarks/rl/run.sh's runs.

    python benchmarks/rl/report.py --runs runs/rl [--out benchmarks/results/rl.json] [--plot benchmarks/results/rl_curves.png]

Reads RUNS/{oracle,orm,qrm,qprobe}/ (log.jsonl, evals/, hacking.json) and RUNS/iterate/round*/done.json;
prints the tables and writes the JSON (and the plot when matplotlib is there). A run not made is
reported as "not run", never filled in. The pre-registered rule (benchmarks/results/rl.md): the
target is the step-0 greedy pass@1 (the same base policy for every reward: LoRA's B starts at 0)
plus TARGET_GAIN; "steps to reach" is the first evaluated step at or above it; the ratio is
steps(ORM) / steps(Q-RM), with a run that never reaches it counted as "> its last step".
Paired differences (95% paired bootstrap over the same held-out problems) where the evaluations
recorded per-problem values: Q-RM - ORM at their last common evaluated step, each run's last
evaluation - its step 0, and each round of iterative Q-probing - round 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REWARDS = ("oracle", "orm", "qrm", "qprobe")
TARGET_GAIN = 0.05  # pre-registered (benchmarks/results/rl.md)
METRIC = "greedy"  # pre-registered primary metric; "sampled" is reported beside it


def read_run(folder: Path) -> dict[str, Any] | None:
    log_path = folder / "log.jsonl"
    if not log_path.is_file():
        return None
    log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    evals = [json.loads(p.read_text()) for p in sorted((folder / "evals").glob("step*.json"))]
    tokens, cum = {0: 0}, 0
    for row in log:
        cum += row["generated_tokens"]
        tokens[row["step"]] = cum
    hacking = json.loads((folder / "hacking.json").read_text()) if (folder / "hacking.json").is_file() else {}
    curve = [{"step": e["step"], "generated_tokens": tokens.get(e["step"]), "greedy": e["greedy"], "sampled": e["sampled"]}
             for e in evals]
    seconds = sum(r["seconds"] for r in log)
    return {"steps": len(log), "curve": curve, "mean_step_seconds": seconds / len(log) if log else None,
            "train_reward": [r["reward"] for r in log], "train_oracle": [r["oracle"] for r in log],
            "flagged": len(hacking.get("flagged", [])), "flagged_examples": hacking.get("flagged", [])[:5]}


def steps_to_reach(curve: list[dict[str, Any]], target: float, metric: str = METRIC) -> int | None:
    for point in curve:
        if point["step"] > 0 and point[metric]["mean"] >= target:
            return int(point["step"])
    return None


def paired(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    """mean(a - b) over the problems both evaluated, with a 95% paired bootstrap interval (None when
    either evaluation lacks per-problem values: runs made before they were recorded)."""
    from qprobe.evaluation.evaluate import MethodResult, paired_difference

    ma, mb = MethodResult.from_json("a", a), MethodResult.from_json("b", b)
    if ma is None or mb is None:
        return None
    d, lo, hi = paired_difference(ma, mb)
    return {"mean": d, "low": lo, "high": hi, "n_prompts": len(set(ma.per_prompt) & set(mb.per_prompt))}


def _fmt(d: dict[str, Any] | None, sign: str = "") -> str:
    if d is None:
        return "n/a (no per-problem values)"
    return f"{d['mean']:{sign}.3f} [{d['low']:{sign}.3f}, {d['high']:{sign}.3f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/rl"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/rl.json"))
    ap.add_argument("--plot", type=Path, default=Path("benchmarks/results/rl_curves.png"))
    args = ap.parse_args(argv)
    runs = {r: read_run(args.runs / r) for r in REWARDS}
    made = {r: v for r, v in runs.items() if v is not None and v["curve"]}
    out: dict[str, Any] = {"target_gain": TARGET_GAIN, "metric": METRIC, "runs": runs}
    if made:
        base = next(iter(made.values()))["curve"][0]
        target = base[METRIC]["mean"] + TARGET_GAIN
        out["base"], out["target"] = base, target
        print(f"step 0 ({METRIC} pass@1): {base[METRIC]['mean']:.3f}; target {target:.3f}")
        print(f"{'reward':<8} {'steps':>5} {'s/step':>7} {'final greedy':>22} {'final sampled':>22} {'reach':>6} {'flagged':>7}")
        for r in REWARDS:
            v = runs[r]
            if v is None or not v["curve"]:
                print(f"{r:<8} not run")
                continue
            last = v["curve"][-1]
            reach = steps_to_reach(v["curve"], target)
            v["steps_to_reach"] = reach
            print(f"{r:<8} {v['steps']:>5} {v['mean_step_seconds'] or 0:>7.1f} {_fmt(last['greedy']):>22} "
                  f"{_fmt(last['sampled']):>22} {reach if reach else '-':>6} {v['flagged']:>7}")
        out["paired"] = {}
        for r, v in made.items():
            first, last = v["curve"][0], v["curve"][-1]
            if last["step"] > first["step"]:
                cell = {m: paired(last[m], first[m]) for m in ("greedy", "sampled")}
                out["paired"][f"{r} step {last['step']} - step {first['step']}"] = cell
        o, q = runs.get("orm"), runs.get("qrm")
        both = bool(o and q and o["curve"] and q["curve"])
        if both:
            at = {p["step"]: p for p in o["curve"]}
            common = [p for p in q["curve"] if p["step"] in at]
            if common:
                qa, oa = common[-1], at[common[-1]["step"]]
                out["paired"][f"qrm - orm at step {qa['step']}"] = {m: paired(qa[m], oa[m]) for m in ("greedy", "sampled")}
        for name, cell in out["paired"].items():
            print(f"paired {name}: greedy {_fmt(cell['greedy'], '+')}  sampled {_fmt(cell['sampled'], '+')}")
        if both:
            so, sq = o.get("steps_to_reach"), q.get("steps_to_reach")
            if so and sq:
                out["ratio_orm_over_qrm"] = so / sq
                verdict = f"steps-to-reach ORM / Q-RM = {so} / {sq} = {so / sq:.2f}"
            else:
                verdict = (f"steps-to-reach ORM {so or '> ' + str(o['steps'])}, Q-RM {sq or '> ' + str(q['steps'])}: "
                           "ratio undefined (at least one never reached the target)")
            out["verdict_line"] = verdict
            print(verdict)
    rounds = sorted((args.runs / "iterate").glob("round*/done.json"), key=lambda p: int(p.parent.name[5:]))
    out["iterate"] = [json.loads(p.read_text()) for p in rounds]
    if out["iterate"]:
        print("iterative Q-probing (held-out):")
        for rep in out["iterate"]:
            cells = "  ".join(f"{n} {_fmt(v)}" for n, v in rep["held_out"].items())
            print(f"  round {rep['round']}: {cells}  picked reward {rep['picked_reward']:.3f}")
        first = out["iterate"][0]
        for rep in out["iterate"][1:]:
            cells = {n: paired(v, first["held_out"][n]) for n, v in rep["held_out"].items() if n in first["held_out"]}
            rep["paired_vs_round0"] = cells
            print(f"  round {rep['round']} - round {first['round']}: "
                  + "  ".join(f"{n} {_fmt(c, '+')}" for n, c in cells.items()))
    else:
        print("iterative Q-probing: not run")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    if made:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot", file=sys.stderr)
            return 0
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for r, v in made.items():
            xs = [p["step"] for p in v["curve"]]
            ts = [p["generated_tokens"] or 0 for p in v["curve"]]
            ys = [p[METRIC]["mean"] for p in v["curve"]]
            axes[0].plot(xs, ys, marker="o", label=r)
            axes[1].plot(ts, ys, marker="o", label=r)
        for ax, xl in zip(axes, ("step", "generated tokens"), strict=True):
            ax.axhline(out["target"], color="grey", ls="--", lw=0.8)
            ax.set_xlabel(xl)
            n = next(iter(made.values()))["curve"][0][METRIC]["n_prompts"]
            ax.set_ylabel(f"{METRIC} pass@1 ({n} MBPP-test)")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
