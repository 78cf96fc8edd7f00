"""Table 1 and Figures 2-4 of the Q-probe paper (Li et al. 2024, Sec. 6.1) on our collected runs.

    python benchmarks/repro/report.py --runs runs/repro --out benchmarks/repro [--k 8] [--beta 0.1] [--seeds 10]

Probes are trained on MBPP-train only (prompts with all n samples scored) and evaluated on MBPP-test
and HumanEval (each when its run exists) with the exact expected return of softmax(Q/beta)
selection among k random samples, averaged over probe seeds (a seed sets the init and the fast
recipe's held-out split), with 95% bootstrap intervals over test problems. Every choice (feature
key, final "best" method) is made by cross-validation over MBPP-train prompts, never on test numbers.
Writes report.json, REPORT.md and fig*.png to --out and the Table 1 summary to --results.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import consensus  # noqa: E402
import visible  # noqa: E402
from fewshot import fewshot_comparisons, fewshot_rows  # noqa: E402
from methods import LOSSES, Fits, Method, Split, cv_return, mean_reward_values, pass_k_values  # noqa: E402
from render import write_outputs  # noqa: E402

from qprobe.evaluation.evaluate import method_result, paired_difference  # noqa: E402

TESTS = {"mbpp_test": "mbpp-test", "humaneval": "humaneval"}
GREEDY = {"mbpp_test": "mbpp-test-greedy", "humaneval": "humaneval-greedy"}
FEWSHOT = {"mbpp_test": "mbpp-test-5shot", "humaneval": "humaneval-5shot"}
FEWSHOT_GREEDY = {"mbpp_test": "mbpp-test-5shot-greedy", "humaneval": "humaneval-5shot-greedy"}
# The API setting (paper Sec. 6.3): HumanEval samples through an OpenAI-compatible server, MiniLM
# features, and the generator's own states added afterwards (collect.sh stage a).
API = {"humaneval_api": "humaneval-api"}
BETAS = (0.0, 0.01, 0.1, 1.0)
TRAIN_SIZES = (5, 10, 20, 50, 100, 200, 464)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="runs/repro", help="folder with mbpp-train, mbpp-test, humaneval, ...")
    ap.add_argument("--out", default="benchmarks/repro", help="where report.json, REPORT.md, fig*.png go")
    ap.add_argument("--results", default=None, help="Table 1 JSON (default: OUT/../results/mbpp.json)")
    ap.add_argument("--k", type=int, default=8, help="headline k (candidates per problem); k=n is shown too")
    ap.add_argument("--beta", type=float, default=0.1, help="headline selection temperature (0 = argmax)")
    ap.add_argument("--seeds", type=int, default=10, help="probe seeds averaged per method")
    ap.add_argument("--paper-seeds", type=int, default=None, help="seeds for the paper recipe (default --seeds)")
    ap.add_argument("--sweep-seeds", type=int, default=5, help="seeds per point of the layer sweep and Fig. 2")
    ap.add_argument("--cv-folds", type=int, default=4, help="folds of MBPP-train prompts for selection")
    ap.add_argument("--cv-seeds", type=int, default=2, help="seeds per fold for selection")
    ap.add_argument("--feature", default="auto", help="feature key(s) for Table 1, '+'-joined; auto = best by CV")
    ap.add_argument("--external", default="Eminilm_mean", help="external-embedding feature key of the API-setting table")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--fewshot-into", default=None, metavar="REPORT_JSON",
                    help="compute only Table 1's 5-shot block (its feature, k and beta from REPORT_JSON) into that "
                         "report.json and re-render its REPORT.md; minutes instead of the whole report")
    return ap.parse_args(argv)


class Experiment:
    """The loaded splits, the fitted probes, and the per-prompt baselines every row is paired with."""

    def __init__(self, args: argparse.Namespace, say: Any) -> None:
        self.args, self.say = args, say
        runs = Path(args.runs)
        self.notes: list[str] = []
        self.train = Split.load(runs / "mbpp-train", "mbpp_train")
        self.tests = self._load(runs, TESTS, "test run")
        self.greedy = self._load(runs, GREEDY, "greedy run")
        self.fewshot = self._load(runs, FEWSHOT, "5-shot run")
        self.fewshot_greedy = self._load(runs, FEWSHOT_GREEDY, "5-shot greedy run")
        self.api = self._load(runs, API, "API-setting run")
        evals = {**self.tests, **{f"{s}_5shot": sp for s, sp in self.fewshot.items()}, **self.api}
        self.fits = Fits(self.train, evals, args.k, args.beta)
        self.n = self.train.n
        self.k = min(args.k, self.n)
        self.ks = sorted({self.k, self.n})
        self.prompts = {s: sp.prompts() for s, sp in self.tests.items()}
        # Rows can be made on every split with its own pass@1 and pass@k (the API run among them).
        own = {**self.tests, **self.api}
        self.p1 = {s: mean_reward_values(sp) for s, sp in own.items()}
        self.pk = {(s, k): pass_k_values(sp, k) for s, sp in own.items() for k in range(1, sp.n + 1)}
        self.api_prompts = {s: sp.prompts() for s, sp in self.api.items()}

    def _load(self, runs: Path, names: dict[str, str], what: str) -> dict[str, Split]:
        out = {}
        for split, folder in names.items():
            if (runs / folder / "manifest.json").exists():
                out[split] = Split.load(runs / folder, split)
                if out[split].dropped:
                    self.say(f"note: {folder}: {out[split].dropped} incomplete prompts left out")
            else:
                note = f"{what} {runs / folder} not collected: its rows are skipped"
                self.notes.append(note)
                self.say(f"note: {note}")
        return out

    # -- rows -------------------------------------------------------------------------------
    def row(self, split: str, values: dict[str, float] | None, k: int) -> dict[str, Any] | None:
        """mean [CI] over the split's test problems (those in `values`), the paired gain over
        pass@1 on the same problems, and the fraction of the pass@1 -> pass@k gap it closes."""
        if values is None:
            return None
        common = [p for p in {**self.prompts, **self.api_prompts}[split] if p in values]
        if len(common) < 2:
            return None
        res = method_result("m", values, common)
        base = method_result("pass@1", self.p1[split], common)
        d, lo, hi = paired_difference(res, base)
        gap = np.mean([self.pk[(split, k)][p] for p in common]) - base.mean
        closed = [d / gap, lo / gap, hi / gap] if gap > 0 else None
        return {"mean": res.mean, "ci": [res.low, res.high], "n_prompts": len(common), "gain": [d, lo, hi],
                "gap_closed": closed}

    def method_rows(self, m: Method, seeds: int, k: int, beta: float, n_prompts: int | None = None) -> dict:
        return {s: self.row(s, self.fits.values(m, seeds, s, k, beta, n_prompts), k) for s in self.tests}

    def paired(self, a: dict[str, float] | None, b: dict[str, float] | None) -> list[float] | None:
        if a is None or b is None:
            return None
        common = [p for p in a if p in b]
        if len(common) < 2:
            return None
        return list(paired_difference(method_result("a", a, common), method_result("b", b, common)))

    def cv(self, m: Method) -> float:
        return cv_return(m, self.train, self.k, self.args.beta, self.args.cv_folds, self.args.cv_seeds)


# ------------------------------------------------------------------------------- sections
def feature_sweep(ex: Experiment) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Every feature key of MBPP-train x each loss: CV on train prompts, test numbers; the headline
    key is the one with the best CV return averaged over the three losses (unless --feature), among
    the keys that every evaluated run carries (test, 5-shot and API runs), so that every row uses it."""
    keys = [k for k in ex.train.keys if all(k in sp.keys for sp in list(ex.tests.values())[:1])]
    both = [k for k in keys if all(k in sp.keys for sp in ex.tests.values())] or keys
    both = [k for k in both if all(k in sp.keys for sp in ex.fits.evals.values())] or both
    table: dict[str, Any] = {}
    for key in keys:
        table[key] = {}
        for loss in LOSSES:
            m = Method(loss, loss=loss, keys=(key,))
            table[key][loss] = {"cv": ex.cv(m), "test": ex.method_rows(m, ex.args.sweep_seeds, ex.k, ex.args.beta)}
        table[key]["cv_mean"] = float(np.mean([table[key][loss]["cv"] for loss in LOSSES]))
    chosen = {loss: max(keys, key=lambda key: table[key][loss]["cv"]) for loss in LOSSES}
    if ex.args.feature == "auto":
        headline = (max(both, key=lambda key: table[key]["cv_mean"]),)
    else:
        headline = tuple(ex.args.feature.split("+"))
    ex.say(f"feature sweep: headline {'+'.join(headline)}; per loss by CV: {chosen}")
    return headline, {"keys": table, "chosen_per_loss": chosen, "headline": list(headline),
                      "headline_candidates": both, "seeds": ex.args.sweep_seeds}


def table1(ex: Experiment, key: tuple[str, ...]) -> dict[str, Any]:
    a, beta = ex.args, ex.args.beta
    paper_seeds = a.paper_seeds or a.seeds
    out: dict[str, Any] = {}
    fewshot: dict[str, Any] = {}  # k -> the 5-shot block, on the 5-shot runs' problems only
    for k in ex.ks:
        rows: dict[str, Any] = {"pass@1": {s: ex.row(s, ex.p1[s], k) for s in ex.tests}}
        rows["greedy"] = {s: ex.row(s, mean_reward_values(ex.greedy[s]) if s in ex.greedy else None, k)
                          for s in ex.tests}
        for recipe, seeds in (("fast", a.seeds), ("paper", paper_seeds)):
            for loss in LOSSES:
                m = Method(loss, loss=loss, recipe=recipe, keys=key)
                rows[f"{loss} ({recipe})"] = ex.method_rows(m, seeds, k, beta)
        rows[f"pass@{k}"] = {s: ex.row(s, ex.pk[(s, k)], k) for s in ex.tests}
        out[str(k)] = rows
        shots = fewshot_rows(ex, key, k)
        if shots["rows"]:
            fewshot[str(k)] = shots
    fast = {loss: {s: ex.fits.values(Method(loss, loss=loss, keys=key), a.seeds, s, ex.k, beta) for s in ex.tests}
            for loss in LOSSES}
    comparisons = {
        "pg-ce": {s: ex.paired(fast["pg"][s], fast["ce"][s]) for s in ex.tests},
        "ce-mse": {s: ex.paired(fast["ce"][s], fast["mse"][s]) for s in ex.tests},
        "pg-mse": {s: ex.paired(fast["pg"][s], fast["mse"][s]) for s in ex.tests},
        "greedy-pass@1": {s: ex.paired(mean_reward_values(ex.greedy[s]), ex.p1[s]) if s in ex.greedy else None
                          for s in ex.tests},
    }
    comparisons.update(fewshot_comparisons(ex, key))
    return {"rows": out, "comparisons": comparisons, "paper_seeds": paper_seeds,
            "fewshot_splits": sorted(ex.fewshot), "fewshot": fewshot}


def api_setting(ex: Experiment, key: tuple[str, ...]) -> dict[str, Any]:
    """Paper Sec. 6.3 / Tables 2 and 5: the same samples scored by probes on the generator's own
    states (`key`) and on an external embedding (MiniLM), each loss, trained on MBPP-train; the
    paired own-minus-external difference per problem. On the API run (samples through the
    OpenAI-compatible server) and on the direct runs where they carry the external feature."""
    external = ex.args.external
    if external not in ex.train.keys:
        return {"note": f"MBPP-train has no {external} feature", "splits": {}}
    out: dict[str, Any] = {}
    splits = {**ex.tests, **ex.api}
    for s, sp in splits.items():
        if external not in sp.keys or not set(key) <= set(sp.keys):
            continue
        k = min(ex.k, sp.n)
        rows: dict[str, Any] = {"pass@1": ex.row(s, ex.p1[s], k)}
        diffs: dict[str, Any] = {}
        for loss in LOSSES:
            own = ex.fits.values(Method(loss, loss=loss, keys=key), ex.args.seeds, s, k, ex.args.beta)
            ext = ex.fits.values(Method(loss, loss=loss, keys=(external,)), ex.args.seeds, s, k, ex.args.beta)
            rows[f"{loss}, own states ({'+'.join(key)})"] = ex.row(s, own, k)
            rows[f"{loss}, external ({external})"] = ex.row(s, ext, k)
            diffs[loss] = ex.paired(own, ext)
        rows[f"pass@{k}"] = ex.row(s, ex.pk[(s, k)], k)
        out[s] = {"k": k, "n": sp.n, "problems": len(sp.prompts()), "rows": rows, "own_minus_external": diffs}
    return {"own": list(key), "external": external, "splits": out}


def figure2(ex: Experiment, key: tuple[str, ...]) -> dict[str, Any]:
    total = len(ex.train.prompts())
    sizes = sorted({s for s in TRAIN_SIZES if s < total} | {total})
    curves: dict[str, Any] = {}
    for loss in LOSSES:
        m = Method(loss, loss=loss, keys=key)
        curves[loss] = {str(size): ex.method_rows(m, ex.args.sweep_seeds, ex.k, ex.args.beta,
                                                  n_prompts=size if size < total else None) for size in sizes}
    return {"sizes": sizes, "curves": curves, "seeds": ex.args.sweep_seeds}


def figure3(ex: Experiment, key: tuple[str, ...]) -> dict[str, Any]:
    a, ks = ex.args, list(range(1, ex.n + 1))
    curves: dict[str, Any] = {s: {} for s in ex.tests}
    per_k: dict[tuple[str, str, int], Any] = {}
    for recipe, seeds in (("fast", a.seeds), ("paper", a.paper_seeds or a.seeds)):
        for loss in LOSSES:
            m = Method(loss, loss=loss, recipe=recipe, keys=key)
            for s in ex.tests:
                vals = [ex.fits.values(m, seeds, s, k, a.beta) for k in ks]
                curves[s][f"{loss} ({recipe})"] = None if vals[0] is None else [float(np.mean(list(v.values()))) for v in vals]
                if recipe == "fast" and vals[0] is not None:
                    per_k.update({(s, loss, k): v for k, v in zip(ks, vals, strict=True)})
    for s in ex.tests:
        curves[s]["pass@1"] = [float(np.mean(list(ex.p1[s].values())))] * len(ks)
        curves[s]["pass@k"] = [float(np.mean(list(ex.pk[(s, k)].values()))) for k in ks]
    k_lo = max(2, ex.n // 4)
    gain = {loss: {s: ex.paired(per_k.get((s, loss, ex.n)), per_k.get((s, loss, k_lo))) for s in ex.tests}
            for loss in LOSSES}

    def gain_diff(a_loss: str, b_loss: str, s: str) -> list[float] | None:
        if (s, a_loss, ex.n) not in per_k or (s, b_loss, ex.n) not in per_k:
            return None
        da = {p: per_k[(s, a_loss, ex.n)][p] - per_k[(s, a_loss, k_lo)][p] for p in per_k[(s, a_loss, ex.n)]}
        db = {p: per_k[(s, b_loss, ex.n)][p] - per_k[(s, b_loss, k_lo)][p] for p in da}
        return ex.paired(da, db)

    diff = {f"pg-{b}": {s: gain_diff("pg", b, s) for s in ex.tests} for b in ("mse", "ce")}
    return {"k": ks, "curves": curves, "k_lo": k_lo, "k_hi": ex.n, "gain_k": gain, "gain_k_diff": diff}


def figure4(ex: Experiment, key: tuple[str, ...]) -> dict[str, Any]:
    """Per problem: mean z-scored probe value (seed-averaged) vs the base model's success rate."""
    from scipy import stats

    out: dict[str, Any] = {}
    splits = {"mbpp_train": ex.train, **ex.tests}
    for loss in LOSSES:
        m = Method(loss, loss=loss, keys=key)
        out[loss] = {}
        for s, sp in splits.items():
            name = "__train__" if s == "mbpp_train" else s
            per_seed = []
            for seed in range(ex.args.seeds):
                sc = ex.fits.scores(m, seed)
                if name not in sc:
                    break
                z = (sc[name] - sc["__train__"].mean()) / max(sc["__train__"].std(), 1e-12)
                per_seed.append(z)
            if not per_seed:
                continue
            z = np.mean(per_seed, axis=0)  # [N]
            ids = sp.prompts()
            q = np.array([z[sp.prompt_ids == p].mean() for p in ids])
            r = np.array([sp.rewards[sp.prompt_ids == p].mean() for p in ids])
            pr = stats.pearsonr(q, r)
            sr = stats.spearmanr(q, r)
            ci = pr.confidence_interval(0.95)
            out[loss][s] = {"pearson": [float(pr.statistic), float(ci.low), float(ci.high)],
                            "pearson_p": float(pr.pvalue), "spearman": float(sr.statistic),
                            "spearman_p": float(sr.pvalue), "q": q.tolist(), "r": r.tolist()}
    return out


def beta_sweep(ex: Experiment, key: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for recipe in ("fast", "paper"):
        seeds = ex.args.seeds if recipe == "fast" else (ex.args.paper_seeds or ex.args.seeds)
        for loss in LOSSES:
            m = Method(loss, loss=loss, recipe=recipe, keys=key)
            out[f"{loss} ({recipe})"] = {str(b): ex.method_rows(m, seeds, ex.k, b) for b in BETAS}
    return out


def candidates(key: tuple[str, ...], second: str | None) -> list[Method]:
    """Section 6 "push past the paper": everything tried, each a `Method`."""
    wide = (100.0, 30.0, 10.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.001, 0.0001)
    pg, lw, bt = Method("pg", keys=key), Method("listwise", loss="listwise", keys=key), Method("bt", loss="bt", keys=key)
    cen = Method("mse, within-prompt centred", loss="mse", centre=True, keys=key)
    out = [Method("mse", loss="mse", keys=key), Method("ce", loss="ce", keys=key), pg, lw, bt, cen,
           Method("pg, paper recipe + standardised", recipe="paper", standardize=True, keys=key),
           Method("mse, paper recipe + standardised", loss="mse", recipe="paper", standardize=True, keys=key),
           Method("pg, wide L2 grid (CV'd, patience 3)", l2_grid=wide, patience=3, keys=key),
           Method("listwise, wide L2 grid", loss="listwise", l2_grid=wide, patience=3, keys=key),
           Method("pg, train beta 0.1", loss_options=(("beta", 0.1),), keys=key),
           Method("pg, MLP 1x64", arch="mlp", keys=key),
           Method("ensemble: pg x 5 seeds", seed_ensemble=5, keys=key),
           Method("pg, within-prompt PCA 32", pca=32, keys=key),
           Method("listwise, within-prompt PCA 32", loss="listwise", pca=32, keys=key),
           Method("mse centred, within-prompt PCA 32", loss="mse", centre=True, pca=32, keys=key),
           Method("ensemble: pg+listwise+bt+centred mse", members=(pg, lw, bt, cen), keys=key),
           Method("ensemble: mse+ce+pg", members=(Method("mse", loss="mse", keys=key),
                                                  Method("ce", loss="ce", keys=key), pg), keys=key)]
    if second is not None:
        both = (*key, second)
        out += [Method(f"pg, concat {'+'.join(both)}", keys=both),
                Method(f"listwise, concat {'+'.join(both)}", loss="listwise", keys=both)]
    return out


def push_past(ex: Experiment, key: tuple[str, ...], sweep: dict[str, Any]) -> dict[str, Any]:
    keys = sweep["keys"]
    others = sorted((k for k in sweep["headline_candidates"] if k not in key), key=lambda k: -keys[k]["cv_mean"])
    rows: dict[str, Any] = {}
    for m in candidates(key, others[0] if others else None):
        t0 = time.perf_counter()
        cv = ex.cv(m)
        rows[m.name] = {"cv": cv, "test": ex.method_rows(m, ex.args.seeds, ex.k, ex.args.beta),
                        "seconds": time.perf_counter() - t0}
        ex.say(f"  {m.name:<45} cv {cv:.4f}")
    best = max(rows, key=lambda name: rows[name]["cv"])
    base = {"pass@1": float(np.mean(list(mean_reward_values(ex.train).values()))),
            f"pass@{ex.k}": float(np.mean(list(pass_k_values(ex.train, ex.k).values())))}
    return {"rows": rows, "best": best, "cv_baselines": base, "criterion": f"{ex.args.cv_folds}-fold CV over MBPP-train prompts x "
            f"{ex.args.cv_seeds} seeds, expected return at k={ex.k}, beta={ex.args.beta}"}


def main(argv: list[str] | None = None, say: Any = print) -> dict[str, Any]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    args = parse_args(argv)
    if args.fewshot_into:
        return fewshot_into(args, say)
    start = time.perf_counter()
    ex = Experiment(args, say)
    say(f"MBPP-train: {len(ex.train.prompts())} complete prompts x n={ex.n}; tests: "
        + ", ".join(f"{s} {len(p)}" for s, p in ex.prompts.items()) + f"; k={ex.k}, beta={args.beta}")
    timings: dict[str, float] = {}

    def timed(name: str, fn: Any, *a: Any) -> Any:
        t0 = time.perf_counter()
        res = fn(*a)
        timings[name] = time.perf_counter() - t0
        say(f"[{name}] {timings[name]:.1f} s")
        return res

    key, sweep = timed("feature sweep", feature_sweep, ex)
    report: dict[str, Any] = {
        "model": ex.train.model, "n": ex.n, "k": ex.k, "k_all": ex.n, "beta": args.beta, "seeds": args.seeds,
        "feature": list(key), "train_prompts": len(ex.train.prompts()), "train_dropped": ex.train.dropped,
        "test_prompts": {s: len(p) for s, p in ex.prompts.items()},
        "greedy_prompts": {s: len(g.prompts()) for s, g in ex.greedy.items()}, "notes": ex.notes,
        "argv": sys.argv[1:] if argv is None else list(argv), "runs": str(args.runs),
    }
    report["table1"] = timed("table 1", table1, ex, key)
    report["api_setting"] = timed("API setting", api_setting, ex, key)
    report["figure2"] = timed("figure 2", figure2, ex, key)
    report["figure3"] = timed("figure 3", figure3, ex, key)
    report["figure4"] = timed("figure 4", figure4, ex, key)
    report["beta_sweep"] = timed("beta sweep", beta_sweep, ex, key)
    report["feature_sweep"] = sweep
    report["push_past"] = timed("push past", push_past, ex, key, sweep)
    kinds = tuple(dict.fromkeys(("text", key[0], "L18_mean")))
    report["consensus"] = timed("consensus", consensus.section, ex, key, kinds)
    report["visible_test"] = timed("visible test", visible.section, ex, key)
    report["timings"] = {**timings, "total": time.perf_counter() - start, "probes_fitted": ex.fits.fitted}
    out = Path(args.out)
    results = Path(args.results) if args.results else out.parent / "results" / "mbpp.json"
    write_outputs(report, out, results, figures=not args.no_figures, say=say)
    return report


def fewshot_into(args: argparse.Namespace, say: Any) -> dict[str, Any]:
    """--fewshot-into: Table 1's 5-shot block, on the 5-shot runs' problems, with the zero-shot rows
    on the same problems, written into an existing report.json (the rest of it untouched)."""
    import json

    path = Path(args.fewshot_into)
    r = json.loads(path.read_text())
    args.k, args.beta, args.seeds = r["k"], r["beta"], r["seeds"]
    ex = Experiment(args, say)
    key = tuple(r["feature"])
    if ex.k != r["k"] or sorted(map(int, r["table1"]["rows"])) != ex.ks:
        raise SystemExit(f"expected runs with n={r['n']} like {path} (k {sorted(r['table1']['rows'])}), got k {ex.ks}")
    blocks = {str(k): b for k in ex.ks if (b := fewshot_rows(ex, key, k))["rows"]}
    changed: list[str] = []
    for kk, b in blocks.items():  # the 5-shot rows themselves must come out as the full run computed them
        old = {name: row for name, row in r["table1"]["rows"][kk].items() if name.startswith("5-shot")}
        for name, row in old.items():
            for s, x in row.items():
                new = b["rows"].get(name, {}).get(s)
                if x is not None and (new is None or abs(new["mean"] - x["mean"]) > 1e-9):
                    got = f"{new['mean']:.4f}" if new else "none"
                    changed.append(f"{name} {s} at k={kk} {x['mean']:.4f} -> {got}")
                    say(f"note: recomputed {name} {s} at k={kk}: {x['mean']:.4f} in {path}, {got} now")
        r["table1"]["rows"][kk] = {name: row for name, row in r["table1"]["rows"][kk].items() if not name.startswith("5-shot")}
    r["table1"]["fewshot"], r["table1"]["fewshot_splits"] = blocks, sorted(ex.fewshot)
    r["table1"]["comparisons"].update(fewshot_comparisons(ex, key))
    r["notes"] = [n for n in r.get("notes", []) if not n.startswith("Table 1's 5-shot block")] + [
        f"Table 1's 5-shot block and its claims were recomputed from {args.runs} (`report.py --fewshot-into`); "
        + (f"against the run that made the rest of this report: {'; '.join(changed)}" if changed
           else "its 5-shot rows equal the ones the whole report computed")]
    results = Path(args.results) if args.results else path.parent.parent / "results" / "mbpp.json"
    write_outputs(r, path.parent, results, figures=False, say=say)
    return r


if __name__ == "__main__":
    main()
