"""Do the RL rewards read the states their probes were trained on? (issue 19)

The reward models are trained on a llama.cpp collection (the GGUF's kernels, its features captured
while sampling), but during REINFORCE they read the frozen base model through transformers (the
trunk's dequantised weights, `qprobe.learn.rewards`). This compares the two on the run's first
--rows rows: cosine of every feature the run stores, and, for each probe given, its scores on
both (Pearson r, the largest difference, and how often the two orders of a within-prompt pair agree).

    python benchmarks/rl/check_features.py runs/rl/rm-data --probe runs/rl/probes/orm --probe runs/rl/probes/qrm

Prints a table; writes benchmarks/results/rl_feature_check.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    from qprobe.core.types import Completion
    from qprobe.features.hf import TransformersEmbedder
    from qprobe.features.spec import FeatureRequest
    from qprobe.probes.models import Probe
    from qprobe.store.run import Run

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--probe", action="append", default=[])
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rl_feature_check.json"))
    a = ap.parse_args()
    run = Run.open(a.run)
    table = run.table(["prompt_id", "prompt", "completion", "n_tokens", "finish_reason", "seed"]).to_pylist()
    rows = np.arange(min(a.rows, len(table)))
    keys = list(run.feature_keys)
    reqs = [FeatureRequest.parse(k.removeprefix("L").replace("_", ":", 1)) for k in keys]
    emb = TransformersEmbedder("", dtype="float32")
    t0 = time.perf_counter()
    mine: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for i in rows:
        r = table[int(i)]
        comp = Completion(r["completion"], int(r["n_tokens"]), r["finish_reason"], int(r["seed"]))
        got = emb.embed(r["prompt"], [comp], reqs)
        for k, q in zip(keys, reqs, strict=True):
            mine[k].append(np.asarray(got[q.key])[0])
    seconds = time.perf_counter() - t0
    out: dict = {"command": "python benchmarks/rl/check_features.py " + " ".join(
        [a.run, *[f"--probe {p}" for p in a.probe], f"--rows {a.rows}"]), "rows": len(rows),
        "seconds_transformers": seconds, "features": {}, "probes": {}}
    hf = {k: np.stack(v) for k, v in mine.items()}
    cpp = {k: run.features(k, rows) for k in keys}
    print(f"{'feature':>10} {'cos min':>8} {'cos median':>10}  ({len(rows)} rows of {a.run})")
    for k in keys:
        x, y = cpp[k].astype(np.float64), hf[k].astype(np.float64)
        cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        out["features"][k] = {"cos_min": float(cos.min()), "cos_median": float(np.median(cos)),
                              "norm_ratio_median": float(np.median(np.linalg.norm(y, axis=1) / np.linalg.norm(x, axis=1)))}
        print(f"{k:>10} {cos.min():>8.4f} {np.median(cos):>10.4f}")
    pids = np.array([table[int(i)]["prompt_id"] for i in rows])
    for path in a.probe:
        probe = Probe.from_pretrained(path)
        k = probe.feature_spec_.key
        s_cpp, s_hf = np.asarray(probe.score(cpp[k]), float), np.asarray(probe.score(hf[k]), float)
        same, pairs = 0, 0
        for p in np.unique(pids):
            idx = np.nonzero(pids == p)[0]
            for u in range(len(idx)):
                for v in range(u + 1, len(idx)):
                    i, j = idx[u], idx[v]
                    pairs += 1
                    same += np.sign(s_cpp[i] - s_cpp[j]) == np.sign(s_hf[i] - s_hf[j])
        r = float(np.corrcoef(s_cpp, s_hf)[0, 1])
        out["probes"][path] = {"feature": k, "pearson_r": r, "max_abs_diff": float(np.abs(s_cpp - s_hf).max()),
                               "score_sd": float(s_cpp.std()), "pair_order_agreement": same / max(pairs, 1),
                               "pairs": pairs}
        print(f"probe {path} ({k}): scores r {r:.4f}, max |diff| {np.abs(s_cpp - s_hf).max():.3f} "
              f"(sd {s_cpp.std():.3f}), within-prompt order agreement {same / max(pairs, 1):.3f} of {pairs} pairs")
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
