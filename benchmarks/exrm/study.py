"""EX-RM vs IM-RM (vs Q-RM, vs the frozen-trunk probe) on one trunk (issue 18; arXiv 2507.07981).

    python benchmarks/exrm/study.py persona       # the controlled shift: 3 seeds
    python benchmarks/exrm/study.py uf            # UltraFeedback: paraphrase / French / Spanish
    python benchmarks/exrm/study.py math          # domain shift: RewardMATH -> RewardBench math, code
    python benchmarks/exrm/study.py table [EXP]   # tables of what is done -> benchmarks/results/exrm_EXP.json

Every stage is resumable: a trained reward model is a folder under --work (re-running continues
from its last step), every evaluation a JSON file of per-pair rewards beside it; a stage that is
done is skipped. The plan of each experiment (`PLANS`: data, sizes, heads, learning-rate grid,
epochs, how the learning rate is chosen) is fixed here before any run and copied into the results
file. Learning rates are chosen per head on the TRAINING pairs only: the training prompts of the
plan's first seed are split once into fit / validation; each grid value trains on fit and the
highest validation accuracy wins (ties: the lower validation loss -log sigmoid(r_c - r_r)). The
chosen value then trains every seed on all training pairs. Every grid value's validation figures
are reported. The frozen probe is qprobe's linear probe (loss bt, its own L2 selection on the
training pairs) on the base model's final-norm last-token state, the EX head's input with the
adapters off (`RewardModel.base_features`).

Each cell: accuracy (ties 1/2) with a 95% bootstrap interval over pairs, the normalised margin
mean|r_c - r_r| / std(all rewards), training seconds per pair; EX - IM paired on the same pairs.
Needs ../shared/data (the paper's data files); nothing here is committed but the results file.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
X = DATA / "exrm_vs_imrm" / "data_files"
UF_REWRITE = "rewritten/rewrite_gpt-4.1_ultrafeedback_seed_982_ntrain_2000_ntest_200_no_translate_prompts_2025_04_19-17_01_44_2025_04_19-19_21_58"
UF_FRENCH = "rewritten/translate_french_gpt-4.1_ultrafeedback_seed_982_ntrain_2000_ntest_200_no_translate_prompts_2025_04_19-17_01_44_2025_04_19-19_37_54"
UF_SPANISH = "rewritten/translate_spanish_gpt-4.1_ultrafeedback_seed_982_ntrain_2000_ntest_200_no_translate_prompts_2025_04_19-17_01_44_2025_04_19-19_38_08"
UF_TEST = "ultrafeedback_seed_982_ntrain_2000_ntest_200_no_translate_prompts_2025_04_19-17_01_44"
RMATH = "rewardmath_seed_982_ntrain_2000_ntest_200_2025_04_13-18_27_54"
RB_MATH = "rewardbench_math_seed_982_ntrain_-1_ntest_200_2025_04_23-15_48_54"
RB_CODE = "rewardbench_code_seed_982_ntrain_-1_ntest_200_2025_04_23-15_49_17"
ORIG = {"chosen": "orig_chosen", "rejected": "orig_rejected"}

COMMON = {"top_blocks": 4, "lora_r": 16, "lora_alpha": 32.0, "batch_pairs": 8, "max_response_tokens": 256,
          "max_prompt_tokens": 512, "dtype": "float32"}
PLANS: dict[str, dict[str, Any]] = {
    "persona": {
        "train": {"source": "persona", "split": "train", "words": "train"},
        "tests": {"original words": {"source": "persona", "split": "test", "words": "train"},
                  "unseen words": {"source": "persona", "split": "test", "words": "unseen"}},
        "seeds": [0, 1, 2],  # each seed: the prompt split and prefix draws (data_seed), adapters, head, order
        "heads": ["ex", "im", "qrm"], "frozen_probe": True,
        # sized from the measured cost (0.26 / 0.58 / 0.36 s a pair-step for ex / im / qrm, 2 cores):
        # 5 epochs (the authors: 50 of full fine-tuning at lr 1e-6), a grid of two LoRA learning rates
        "lr_grid": [1e-4, 1e-3], "epochs": 5, "validation": 20,
        "settings": COMMON,
    },
    "uf": {
        "train": {"source": UF_REWRITE, "split": "train", "fields": ORIG},  # the 200 recoverable UF train pairs
        "tests": {"in distribution": {"source": UF_TEST, "split": "test"},
                  "paraphrased": {"source": UF_REWRITE, "split": "test"},
                  "French": {"source": UF_FRENCH, "split": "test"},
                  "Spanish": {"source": UF_SPANISH, "split": "test"}},
        "seeds": [0], "heads": ["ex", "im", "qrm"], "frozen_probe": True,
        "lr_grid": [1e-4, 1e-3], "epochs": 2, "validation": 50,
        "settings": COMMON,
    },
    "math": {
        "train": {"source": RMATH, "split": "train", "limit": 300},  # the first 300 of RewardMATH train
        "tests": {"RewardMATH test": {"source": RMATH, "split": "test"},
                  "RewardBench math": {"source": RB_MATH, "split": "test"},
                  "RewardBench code": {"source": RB_CODE, "split": "test"}},
        "seeds": [0], "heads": ["ex", "im", "qrm"], "frozen_probe": True,
        "lr_grid": [1e-4, 1e-3], "epochs": 2, "validation": 75,
        "settings": COMMON,
    },
}


def load(spec: dict[str, Any], seed: int) -> list[Any]:
    from qprobe.tasks.pairs import load_pairs
    from qprobe.tasks.persona import persona_pairs

    if spec["source"] == "persona":
        return persona_pairs(DATA / "persona" / "agreeableness.jsonl", spec["split"], spec["words"], seed=seed)
    return load_pairs(X / spec["source"], split=spec["split"], fields=spec.get("fields"), limit=spec.get("limit"))


def bt_loss(c: np.ndarray, r: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0.0, -(c - r))))


class Study:
    def __init__(self, exp: str, work: Path, progress: bool, model: str = "") -> None:
        plan = PLANS[exp]
        self.exp, self.progress = exp, progress
        self.plan = plan if not model else {**plan, "settings": {**plan["settings"], "model": model, "top_blocks": 2}}
        self.root = work / exp
        self.root.mkdir(parents=True, exist_ok=True)
        plan_file = self.root / "plan.json"
        if plan_file.exists() and json.loads(plan_file.read_text()) != self.plan:
            raise SystemExit(f"expected the plan of {plan_file} to be today's PLANS['{exp}'], got another; "
                             "a plan is fixed before the runs: start a new --work folder to change it")
        plan_file.write_text(json.dumps(self.plan, indent=1))

    def cache(self, name: str) -> Path:
        return self.root / "cache" / name.replace(" ", "_")

    def train(self, name: str, head: str, lr: float, seed: int, pairs: list[Any], cache: Path) -> Any:
        """Train (or resume, or load) one reward model; returns it fitted, in memory."""
        from qprobe.rm import RewardModel, RMConfig, load_rm, save_rm

        out = self.root / name
        if (out / "config.json").exists() and json.loads((out / "config.json").read_text())["provenance"]["finished"]:
            return load_rm(out)
        cfg = RMConfig(head=head, lr=lr, epochs=self.plan["epochs"], seed=seed, **self.plan["settings"])
        rm = RewardModel(cfg).fit(pairs, source=f"{self.exp}:{name}", workdir=out / "work", cache_dir=cache,
                                  progress=self.progress)
        save_rm(rm, out)
        return rm

    def evaluate(self, rm: Any, name: str, test: str, pairs: list[Any], cache: Path) -> dict[str, Any]:
        f = self.root / name / f"eval-{test.replace(' ', '_')}.json"
        if f.exists():
            return json.loads(f.read_text())  # type: ignore[no-any-return]
        t0 = time.perf_counter()
        c, r = rm.rewards(pairs, progress=self.progress, cache_dir=cache)
        got = {"test": test, "pairs": len(pairs), "seconds": time.perf_counter() - t0, "chosen": c.tolist(),
               "rejected": r.tolist(), "ids": [p.id for p in pairs]}
        f.write_text(json.dumps(got))
        return got

    def frozen_probe(self, seed: int, train: list[Any], tests: dict[str, list[Any]]) -> None:
        """qprobe's linear bt probe on the base model's EX-position states."""
        from qprobe.probes import LinearProbe, TrainConfig
        from qprobe.rm import RewardModel, RMConfig

        folder = self.root / f"probe-s{seed}"
        if all((folder / f"eval-{t.replace(' ', '_')}.json").exists() for t in tests):
            return
        folder.mkdir(parents=True, exist_ok=True)
        rm = RewardModel(RMConfig(head="ex", seed=seed, **self.plan["settings"])).build()
        t0 = time.perf_counter()
        x = rm.base_features(train, self.progress, self.cache(f"train-s{seed}"))
        probe = LinearProbe(loss="bt", train=TrainConfig(k=2), seed=seed).fit(pairs=x)
        fit_seconds = time.perf_counter() - t0
        for test, pairs in tests.items():
            t1 = time.perf_counter()
            xc, xr = rm.base_features(pairs, self.progress, self.cache(f"{test}-s{seed}"))
            got = {"test": test, "pairs": len(pairs), "seconds": time.perf_counter() - t1,
                   "chosen": probe.score(xc).tolist(), "rejected": probe.score(xr).tolist(),
                   "ids": [p.id for p in pairs], "l2": probe.history_.get("l2"), "fit_seconds": fit_seconds}
            (folder / f"eval-{test.replace(' ', '_')}.json").write_text(json.dumps(got))

    def choose_lr(self, head: str) -> float:
        """The grid value with the best validation accuracy on the first seed's training pairs."""
        from qprobe.evaluation.preferences import pairwise_outcomes

        f = self.root / f"lr-{head}.json"
        if f.exists():
            return float(json.loads(f.read_text())["chosen"])
        seed = self.plan["seeds"][0]
        pairs = load(self.plan["train"], seed)
        order = np.random.default_rng([seed, 7]).permutation(len(pairs))
        n_val = self.plan["validation"]
        fit = [pairs[i] for i in sorted(order[n_val:])]
        val = [pairs[i] for i in sorted(order[:n_val])]
        rows = []
        for lr in self.plan["lr_grid"]:
            name = f"select/{head}-lr{lr:g}"
            rm = self.train(name, head, lr, seed, fit, self.cache(f"select-fit-s{seed}"))
            e = self.evaluate(rm, name, "validation", val, self.cache(f"select-val-s{seed}"))
            c, r = np.array(e["chosen"]), np.array(e["rejected"])
            rows.append({"lr": lr, "accuracy": float(pairwise_outcomes(c, r).mean()), "loss": bt_loss(c, r),
                         "train_loss_last": rm.losses_[-1], "seconds_per_pair": rm.provenance_.get("seconds_per_pair")})
            del rm
        best = max(rows, key=lambda x: (x["accuracy"], -x["loss"]))
        f.write_text(json.dumps({"head": head, "fit_pairs": len(fit), "validation_pairs": len(val), "grid": rows,
                                 "chosen": best["lr"]}, indent=1))
        return float(best["lr"])

    def run(self) -> None:
        lrs = {head: self.choose_lr(head) for head in self.plan["heads"]}
        for seed in self.plan["seeds"]:
            train = load(self.plan["train"], seed)
            tests = {t: load(spec, seed) for t, spec in self.plan["tests"].items()}
            if self.plan["frozen_probe"]:
                self.frozen_probe(seed, train, tests)
            for head in self.plan["heads"]:
                name = f"{head}-s{seed}"
                rm = self.train(name, head, lrs[head], seed, train, self.cache(f"train-s{seed}"))
                for test, pairs in tests.items():
                    self.evaluate(rm, name, test, pairs, self.cache(f"{test}-s{seed}"))
                del rm
            print(f"{self.exp}: seed {seed} done")


# ------------------------------------------------------------------------------------ tables
def cell(e: dict[str, Any]) -> dict[str, Any]:
    from qprobe.evaluation.preferences import accuracy, normalised_margin, pairwise_outcomes

    c, r = np.array(e["chosen"]), np.array(e["rejected"])
    o = pairwise_outcomes(c, r)
    return {"outcomes": o, **accuracy(o).to_dict(), "margin": normalised_margin(c, r)}


def table(exp: str, work: Path, out: Path) -> dict[str, Any] | None:
    from qprobe.evaluation.preferences import accuracy, accuracy_difference

    plan, root = PLANS[exp], work / exp
    if not root.is_dir():
        print(f"{exp}: nothing run yet under {root}")
        return None
    rows: dict[str, Any] = {"experiment": exp, "plan": plan, "command": f"python benchmarks/exrm/study.py {exp}",
                            "lr_selection": {}, "cells": [], "ex_minus_im": []}
    for head in plan["heads"]:
        f = root / f"lr-{head}.json"
        if f.exists():
            rows["lr_selection"][head] = json.loads(f.read_text())
    methods = [(h, f"{h}-s{{seed}}") for h in plan["heads"]] + ([("frozen probe", "probe-s{seed}")] if plan["frozen_probe"] else [])
    for test in plan["tests"]:
        pooled: dict[str, list[np.ndarray]] = {}
        for seed in plan["seeds"]:
            got: dict[str, dict[str, Any]] = {}
            for method, folder in methods:
                f = root / folder.format(seed=seed) / f"eval-{test.replace(' ', '_')}.json"
                if not f.exists():
                    continue
                e = json.loads(f.read_text())
                got[method] = cell(e)
                cfg = root / folder.format(seed=seed) / "config.json"
                prov = json.loads(cfg.read_text())["provenance"] if cfg.exists() else {}
                rows["cells"].append({"test": test, "seed": seed, "method": method,
                                      **{k: v for k, v in got[method].items() if k != "outcomes"},
                                      "train_seconds_per_pair": prov.get("seconds_per_pair"),  # wall
                                      "train_cpu_seconds_per_pair": prov.get("cpu_seconds_per_pair"),  # None before it was kept
                                      "eval_seconds_per_pair": e["seconds"] / e["pairs"]})
                pooled.setdefault(method, []).append(got[method]["outcomes"])
            if "ex" in got and "im" in got:
                d, lo, hi = accuracy_difference(got["ex"]["outcomes"], got["im"]["outcomes"])
                rows["ex_minus_im"].append({"test": test, "seed": str(seed), "diff": d, "low": lo, "high": hi})
        if len(plan["seeds"]) > 1 and all(len(v) == len(plan["seeds"]) for v in pooled.values()) and pooled:
            for method, outs in pooled.items():  # all seeds' pairs together: one interval over them
                rows["cells"].append({"test": test, "seed": "all", "method": method, **accuracy(np.concatenate(outs)).to_dict()})
            if "ex" in pooled and "im" in pooled:
                d, lo, hi = accuracy_difference(np.concatenate(pooled["ex"]), np.concatenate(pooled["im"]))
                rows["ex_minus_im"].append({"test": test, "seed": "all", "diff": d, "low": lo, "high": hi})
    print(f"\n{exp}: learning rates chosen on training pairs: "
          + ", ".join(f"{h} {s['chosen']:g} (grid " + " ".join(f"{g['lr']:g}:{g['accuracy']:.3f}/{g['loss']:.3f}" for g in s["grid"]) + ")"
                      for h, s in rows["lr_selection"].items()))
    print(f"{'test':<18} {'seed':>4} {'method':<13} {'accuracy':>8}  95% CI          margin  train s/pair: wall, CPU")
    for c in rows["cells"]:
        margin = f"{c['margin']:6.3f}" if "margin" in c else "      "
        spp, cpu = c.get("train_seconds_per_pair"), c.get("train_cpu_seconds_per_pair")
        print(f"{c['test']:<18} {c['seed']!s:>4} {c['method']:<13} {c['accuracy']:8.3f}  [{c['low']:.3f}, {c['high']:.3f}]  "
              f"{margin}  {'' if spp is None else f'{spp:.2f}'}{'' if cpu is None else f', {cpu:.2f}'}")
    for d in rows["ex_minus_im"]:
        print(f"EX - IM  {d['test']:<18} seed {d['seed']:>3}: {d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v) + "\n")
    print(f"wrote {out}")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=[*PLANS, "table"])
    ap.add_argument("experiments", nargs="*", help="for `table`: which (default all)")
    ap.add_argument("--work", type=Path, default=Path("runs/exrm"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", default="", help="another base model (a check on a tiny one; not the plan's)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.stage == "table":
        for exp in args.experiments or list(PLANS):
            table(exp, args.work, Path(f"benchmarks/results/exrm_{exp}.json"))
        return
    Study(args.stage, args.work, not args.no_progress, args.model).run()
    table(args.stage, args.work, Path(f"benchmarks/results/exrm_{args.stage}.json"))


if __name__ == "__main__":
    main()
