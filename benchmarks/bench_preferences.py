"""The preference setting (paper section 7) on pairs runs written by `qprobe pairs embed`.

For each data set: linear probes trained with bt (Eq. 6-7), dpo (App. B) and margin_bt (Q-RM),
pairwise accuracy on held-out pairs with 95% bootstrap intervals (ties 1/2), next to a
"longer response wins" baseline; then Figure 6 (accuracy against the fraction of training pairs
for a linear probe and 2- and 3-layer MLPs) on the first data set. Prints tables, writes JSON and
a PNG. Runs that are missing are skipped.

    OMP_NUM_THREADS=1 python benchmarks/bench_preferences.py --runs runs/pairs \
        --json benchmarks/results/preferences.json --figure benchmarks/results/preferences_fig6.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from qprobe.cli.pairs_cmds import probe_factories
from qprobe.evaluation.preferences import (
    accuracy,
    accuracy_difference,
    learning_curve,
    pairwise_outcomes,
    plot_learning_curve,
    probe_outcomes,
    split_indices,
)
from qprobe.probes import LinearProbe, TrainConfig
from qprobe.store import Run
from qprobe.store.pairs import PairRows, read_pairs

LOSSES = ("bt", "dpo", "margin_bt")
# name: (train run, {test name: test run}); a test run of None = a random 40% of the train run's pairs
DATASETS = {
    "HH-RLHF harmless": ("hh-train", {"in-distribution": "hh-test"}),
    "GSM8K Q-RM pairs": ("gsm8k", {"in-distribution (40% held out)": None}),
    "UltraFeedback": ("uf-train", {"in-distribution": "uf-test", "paraphrased (GPT-4.1)": "uf-rewrite",
                                   "French": "uf-french", "Spanish": "uf-spanish"}),
}


def complete(path: Path) -> bool:
    return (path / "manifest.json").is_file() and bool(Run.open(path).manifest.get("complete"))


def lengths(rows: PairRows) -> tuple[np.ndarray, np.ndarray]:
    t = rows.run.table(["completion"]).column("completion").to_pylist()
    return (np.array([len(t[i]) for i in rows.chosen], dtype=float),
            np.array([len(t[i]) for i in rows.rejected], dtype=float))


def evaluate_dataset(runs: Path, train_name: str, tests: dict[str, str | None], seed: int) -> dict:
    train = read_pairs(runs / train_name)
    key = train.run.feature_keys[0]
    spec = train.run.feature_spec(key)
    splits: dict[str, PairRows] = {}
    for name, test_run in tests.items():
        if test_run is None:
            tr, te = split_indices(len(train), 0.4, np.random.default_rng(seed))
            splits[name] = train.take(te)
            train = train.take(tr)
        elif complete(runs / test_run):
            splits[name] = read_pairs(runs / test_run)
            spec.check_compatible(splits[name].run.feature_spec(key))
    x_train = train.features(key)
    out: dict = {"train_pairs": len(train), "feature": spec.describe(), "tests": {}}
    for name, rows in splits.items():
        x_test = rows.features(key)
        res: dict = {"pairs": len(rows)}
        c, r = lengths(rows)
        res["longer response"] = accuracy(pairwise_outcomes(c, r)).to_dict()
        first = None
        for loss in LOSSES:
            t0 = time.perf_counter()
            probe = LinearProbe(loss=loss, train=TrainConfig(k=2), seed=seed).fit(pairs=x_train, spec=spec)
            o = probe_outcomes(probe, x_test)
            res[f"linear {loss}"] = {**accuracy(o).to_dict(), "fit_seconds": time.perf_counter() - t0,
                                     "l2": probe.history_.get("l2")}
            if first is None:
                first = o
            else:
                d, lo, hi = accuracy_difference(o, first)
                res[f"linear {loss}"]["vs bt"] = [d, lo, hi]
        out["tests"][name] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/pairs"))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/preferences.json"))
    ap.add_argument("--figure", type=Path, default=Path("benchmarks/results/preferences_fig6.png"))
    ap.add_argument("--fractions", default="0.1,0.25,0.5,1.0")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    results: dict = {"datasets": {}}
    for name, (train_run, tests) in DATASETS.items():
        if not complete(args.runs / train_run):
            print(f"skip {name}: no complete run {args.runs / train_run}")
            continue
        res = evaluate_dataset(args.runs, train_run, tests, args.seed)
        results["datasets"][name] = res
        print(f"\n{name}: {res['train_pairs']} training pairs; {res['feature']}")
        print(f"  {'test set':<32} {'method':<18} {'accuracy':>8}  95% CI            ties  vs bt")
        for test, methods in res["tests"].items():
            for method, m in methods.items():
                if method == "pairs":
                    continue
                vs = m.get("vs bt")
                vs_text = f"{vs[0]:+.3f} [{vs[1]:+.3f}, {vs[2]:+.3f}]" if vs else ""
                print(f"  {test + ' (' + str(methods['pairs']) + ')':<32} {method:<18} {m['accuracy']:8.3f}  "
                      f"[{m['low']:.3f}, {m['high']:.3f}] {m['ties']:5d}  {vs_text}")
    first = next(iter(results["datasets"]), None)
    if first is not None:
        train_run, tests = DATASETS[first]
        train = read_pairs(args.runs / train_run)
        test = read_pairs(args.runs / next(iter(tests.values())))
        key = train.run.feature_keys[0]
        t0 = time.perf_counter()
        curve = learning_curve(train.features(key), test.features(key), [float(f) for f in args.fractions.split(",")],
                               probe_factories("bt"), seeds=args.seeds, rng=np.random.default_rng(args.seed),
                               spec=train.run.feature_spec(key))
        curve["seconds"] = time.perf_counter() - t0
        results["figure6"] = {"dataset": first, **curve}
        print(f"\nFigure 6 ({first}, loss bt, {args.seeds} seeds, test {curve['n_test']} pairs): accuracy by training pairs")
        print(f"  {'probe':<14} " + "  ".join(f"{n:>6d}" for n in curve["n_train"]))
        for name, ys in curve["curves"].items():
            print(f"  {name:<14} " + "  ".join(f"{y:6.3f}" for y in ys))
        if plot_learning_curve(curve, args.figure, f"{first}: test accuracy vs training pairs (loss bt)"):
            print(f"wrote {args.figure}")
    args.json.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
