"""The fast recipe's L2 penalty chosen on one held-out quarter of the training prompts (the default)
against K-fold over them (`TrainConfig(select_folds=K)`), on the collected runs.

    OMP_NUM_THREADS=1 python benchmarks/repro/l2_folds.py --runs runs/repro-full \
        --out benchmarks/results/l2_folds.json [--key L18_mean] [--seeds 10] [--folds 4]

For each loss and setting: the penalty each seed chose, and the mean [min, max] over seeds of the
exact expected return at k, beta on MBPP-test and HumanEval (probes trained on MBPP-train), and the
seconds per fit. The seed moves only the held-out split (and the folds), so the spread over seeds
is the spread the penalty choice adds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import LOSSES, Split, probe_values  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="runs/repro")
    ap.add_argument("--out", default="benchmarks/results/l2_folds.json")
    ap.add_argument("--key", default="L18_mean")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--beta", type=float, default=0.1)
    args = ap.parse_args()

    from qprobe.probes.models import LinearProbe
    from qprobe.probes.train import TrainConfig

    train = Split.load(f"{args.runs}/mbpp-train", "mbpp_train")
    tests = {name: Split.load(f"{args.runs}/{run}", name) for name, run in
             (("mbpp_test", "mbpp-test"), ("humaneval", "humaneval"))}
    key = (args.key,)
    x, r, g = train.features(key), train.rewards, train.prompt_ids  # [N, d], [N], [N]
    rows = {}
    print(f"train: {len(train.prompts())} prompts; " + ", ".join(f"{s} {len(t.prompts())}" for s, t in tests.items())
          + f"; {args.key}, k={args.k}, beta={args.beta}, {args.seeds} seeds")
    print(f"{'setting':<10} {'loss':<4} " + " ".join(f"{s:>24}" for s in tests) + "   s/fit  penalties chosen")
    for folds in (1, args.folds):
        for loss in LOSSES:
            chosen, returns, seconds = [], {s: [] for s in tests}, []
            for seed in range(args.seeds):
                cfg = TrainConfig(k=args.k, beta=args.beta, select_folds=folds)
                start = time.perf_counter()
                probe = LinearProbe(loss=loss, train=cfg, seed=seed).fit(x, r, g)
                seconds.append(time.perf_counter() - start)
                chosen.append(probe.history_["l2"])
                for s, split in tests.items():
                    values = probe_values(split, probe.score(split.features(key)).astype(np.float64), args.k, args.beta)
                    returns[s].append(float(np.mean(list(values.values()))))
            name = "one split" if folds == 1 else f"{folds} folds"
            row = {s: [float(np.mean(v)), float(np.min(v)), float(np.max(v))] for s, v in returns.items()}
            rows[f"{name} / {loss}"] = {"l2": chosen, "seconds_per_fit": float(np.mean(seconds)), **row}
            cells = " ".join(f"{m:.3f} [{lo:.3f}, {hi:.3f}]".rjust(24) for m, lo, hi in row.values())
            print(f"{name:<10} {loss:<4} {cells}   {np.mean(seconds):5.2f}  {chosen}")
    out = {"runs": args.runs, "key": args.key, "k": args.k, "beta": args.beta, "seeds": args.seeds,
           "train_prompts": len(train.prompts()), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
