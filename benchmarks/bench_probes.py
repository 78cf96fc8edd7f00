"""Probe training: wall time of recipe "paper" vs "fast", and the held-out expected return each reaches.

Data: synthetic runs of the real MBPP shape (464 prompts x 16 samples x 896 dims, see synthetic.py),
a quarter of the prompts held out. Each (loss, recipe) is fitted once per data seed after a warm-up
fit, so one-off costs (torch's first call) are not counted. Prints a table and writes
benchmarks/results/probes.json.

    python benchmarks/bench_probes.py [--seeds 3] [--threads 2] [--losses pg,ce,mse,listwise,bt]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import synthetic_run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--losses", default="pg,ce,mse,listwise,bt")
    ap.add_argument("--recipes", default="paper,fast")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--mlp", action="store_true", help="also an MLP probe (depth 2, width 256), fast recipe")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "probes.json"))
    args = ap.parse_args()

    import torch

    from qprobe.probes import LinearProbe, MLPProbe, TrainConfig, rerank_metrics
    from qprobe.probes.data import split_prompts

    torch.set_num_threads(args.threads)
    losses, recipes = args.losses.split(","), args.recipes.split(",")
    configs = [(loss, recipe, "linear") for loss in losses for recipe in recipes]
    if args.mlp:
        configs.append(("pg", "fast", "mlp"))
    rows: dict[tuple[str, str, str], list[dict[str, float]]] = {c: [] for c in configs}
    base: list[dict[str, float]] = []
    for seed in range(args.seeds):
        x, r, g = synthetic_run(seed=seed)
        keep, held = split_prompts(g, 0.25, np.random.default_rng(1000 + seed))
        LinearProbe(train=TrainConfig(l2_grid=(1.0,), max_iter=2)).fit(x[:512], r[:512], g[:512])  # warm-up
        for loss, recipe, arch in configs:
            cls = MLPProbe if arch == "mlp" else LinearProbe
            probe = cls(loss=loss, train=TrainConfig(recipe=recipe), seed=seed)
            start = time.perf_counter()
            probe.fit(x[keep], r[keep], g[keep])
            seconds = time.perf_counter() - start
            m = rerank_metrics(probe, x[held], r[held], g[held], k=args.k)
            rows[(loss, recipe, arch)].append({"seconds": seconds, "expected_return": m["expected_return"],
                                               "l2": probe.history_.get("l2")})
            print(f"seed {seed} {arch:6} {loss:9} {recipe:5} {seconds:6.2f} s  E[r]@{args.k} "
                  f"{m['expected_return']:.4f}", flush=True)
        base.append(m)

    summary = []
    print(f"\n{'probe':7} {'loss':9} {'recipe':6} {'seconds':>8} {'E[r]@' + str(args.k):>8} {'speed-up':>9}")
    for (loss, recipe, arch), vals in rows.items():
        sec = float(np.median([v["seconds"] for v in vals]))
        ret = float(np.mean([v["expected_return"] for v in vals]))
        paper = rows.get((loss, "paper", "linear"))
        speedup = float(np.median([v["seconds"] for v in paper])) / sec if paper and recipe == "fast" else None
        summary.append({"probe": arch, "loss": loss, "recipe": recipe, "median_seconds": sec,
                        "mean_expected_return": ret, "speedup_vs_paper": speedup,
                        "per_seed": vals})
        print(f"{arch:7} {loss:9} {recipe:6} {sec:8.3f} {ret:8.4f} {'' if speedup is None else f'{speedup:8.1f}x'}")
    pass1 = float(np.mean([b["pass@1"] for b in base]))
    passk = float(np.mean([b["pass@k"] for b in base]))
    print(f"held-out pass@1 {pass1:.4f}   pass@{args.k} {passk:.4f}")
    result = {
        "benchmark": "probes", "data": "synthetic_run(464 prompts x 16 samples x 896 dims), 25% prompts held out",
        "k": args.k, "beta": 0.0, "seeds": args.seeds, "torch_threads": args.threads,
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
        "heldout_pass@1": pass1, f"heldout_pass@{args.k}": passk, "rows": summary,
        "command": "python " + " ".join(sys.argv),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
