"""Continuous batching vs one prompt at a time, against llama.cpp's decode limit, in one run.

For each workload (a: MBPP chat prompts, long answers; b: HumanEval completion prompts, short
answers cut at the task's stop sequences), on the same model and the same prompts:
1. the decode limit at S sequences: the back-end's own context set up as a collection uses it
   (a KV stream a sequence, embeddings on, the feature's layer captured), S sequences sharing
   one prompt, one token per sequence per step drawn by llama.cpp's temperature/top-p sampler
   (through `backend.sample`, the rows spread over the threads, as the pool draws them),
   end-of-text ignored, over the first --steps tokens after the prompt (short contexts: the
   cheapest steps of a collection);
2. `collect` as before continuous batching (`batching=prompt`: one prompt's samples at a time);
3. `collect` with continuous batching at each S.
Both collections are whole `collect` calls into fresh runs: model load, features (18:mean),
sampler and sandboxed rewards included. Throughput = completion tokens stored / wall seconds.
It also reports how many texts are identical between the two collections (same seeds: they
differ only where a batch rounds differently) and, with --repeat, between two continuous runs.

    python benchmarks/bench_batching.py --prompts 12 --n 8 --slots 8 16 32 --repeat --unified --no-share

Since prompt tokens cost about as much as decoded ones here and the decode limit has none, each
continuous run also reports (prompt + generated tokens) / s against the limit.

Writes benchmarks/results/batching.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
FEATURE = "18:mean"


def workloads(args: argparse.Namespace) -> dict[str, dict]:
    return {
        "mbpp-chat": {"task": "mbpp", "split": "test", "task_options": {"data": str(DATA / "mbpp"), "prompt_format": "chat"}},
        "humaneval": {"task": "humaneval", "split": "test", "task_options": {}},
    }


def decode_limit(slots: int, text: str, args: argparse.Namespace) -> dict:
    from qprobe.generation.base import SamplingConfig
    from qprobe.generation.llamacpp import LlamaCppBackend

    with LlamaCppBackend(n_seq_max=slots, n_threads=args.threads) as b:  # the default KV: a stream a sequence
        b.capture([18])
        b.capture_states = True
        lib = b._lib
        tokens = b.prompt_tokens(text)
        b.evaluate_prompt(tokens, slots, want_state=False)
        b.set_embeddings(True)
        sc = SamplingConfig(temperature=args.temperature, top_p=args.top_p)
        samplers = [b._sampler(sc, s) for s in range(slots)]
        rows = [0] * slots
        t0 = time.perf_counter()
        for step in range(args.steps):
            drawn = b.sample(list(zip(samplers, rows, strict=True)))  # as the pool draws (its threads)
            feed = [(tok, len(tokens) + step, s, True) for s, tok in enumerate(drawn)]
            b.decode(feed)
            b.states(slots)  # what a collection reads back every step
            rows = list(range(slots))
        dt = time.perf_counter() - t0
        for smp in samplers:
            lib.llama_sampler_free(smp)
    return {"slots": slots, "tokens": slots * args.steps, "seconds": round(dt, 2), "tok_per_s": round(slots * args.steps / dt, 1)}


def run_collect(work: dict, out: Path, backend_options: dict, args: argparse.Namespace) -> dict:
    from qprobe.collection.collect import CollectConfig, collect
    from qprobe.generation.base import SamplingConfig
    from qprobe.generation.llamacpp import LlamaCppBackend
    from qprobe.store.run import Run

    cfg = CollectConfig(
        task=work["task"], split=work["split"], out=out, n=args.n, limit=args.prompts, features=(FEATURE,),
        task_options=work["task_options"], feature_dtype="float16",
        backend_options={"n_threads": args.threads, **backend_options},
        sampling=SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                seed=args.seed),
    )
    t0 = time.perf_counter()
    collect(cfg, progress=False)
    dt = time.perf_counter() - t0
    rows = Run.open(out).table(["prompt_id", "prompt", "sample_index", "completion", "n_tokens", "reward"]).to_pylist()
    tokens = sum(r["n_tokens"] for r in rows)
    prompts = {r["prompt_id"]: r["prompt"] for r in rows}
    with LlamaCppBackend(n_ctx=256, n_threads=1) as tok:  # each distinct prompt's tokens, once
        prompt_tokens = sum(len(tok.prompt_tokens(t)) for t in prompts.values())
    texts = {(r["prompt_id"], r["sample_index"]): r["completion"] for r in rows}
    mean_reward = sum(r["reward"] or 0 for r in rows) / len(rows)
    return {"options": backend_options, "samples": len(rows), "tokens": tokens, "seconds": round(dt, 2),
            "tok_per_s": round(tokens / dt, 1), "prompt_tokens": prompt_tokens,
            "with_prompts_tok_per_s": round((tokens + prompt_tokens) / dt, 1),
            "mean_reward": round(mean_reward, 4), "_texts": texts}


def same(a: dict, b: dict) -> float:
    keys = a["_texts"].keys() & b["_texts"].keys()
    return round(sum(a["_texts"][k] == b["_texts"][k] for k in keys) / max(1, len(keys)), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=12, help="first N prompts of each workload")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--slots", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--steps", type=int, default=48, help="decode steps of the decode-limit measurement")
    ap.add_argument("--max-new-tokens", type=int, default=300)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="+", default=None, help="workloads to run (default: all)")
    ap.add_argument("--repeat", action="store_true", help="a second continuous run at the best S (determinism)")
    ap.add_argument("--unified", action="store_true",
                    help="also a continuous run at the largest S with one unified KV cache (kv_unified=True)")
    ap.add_argument("--no-share", action="store_true",
                    help="also a continuous run at the best S with share_prefix=False (every prompt evaluated whole)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "batching.json")
    args = ap.parse_args()
    os.environ.setdefault("QPROBE_ALLOW_CODE_EXECUTION", "1")
    from qprobe.catalog import TASKS
    from qprobe.generation.llamacpp import LlamaCppBackend

    record: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(), "cpus": os.cpu_count(),
                    "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "workloads": {}}
    for name, work in workloads(args).items():
        if args.only and name not in args.only:
            continue
        task = TASKS.create(work["task"], **work["task_options"])
        with LlamaCppBackend(n_ctx=256, n_threads=1) as tmp:
            text = tmp.render(task.prompts(work["split"])[0])
        res: dict = {"decode_limit": [decode_limit(s, text, args) for s in args.slots]}
        best = max(res["decode_limit"], key=lambda r: r["tok_per_s"])
        with tempfile.TemporaryDirectory() as tmp_dir:
            d = Path(tmp_dir)
            per_prompt = run_collect(work, d / "prompt", {"batching": "prompt"}, args)
            cont = []
            for s in args.slots:  # the default KV: a stream of 1024 cells a sequence
                cont.append(run_collect(work, d / f"cont{s}", {"n_seq_max": s}, args))
            top = max(cont, key=lambda r: r["tok_per_s"])
            if args.unified:
                s = max(args.slots)
                n_ctx = max(8192, s * (args.max_new_tokens + 1) + 2048)
                res["continuous_unified_kv"] = run_collect(
                    work, d / "unified", {"n_seq_max": s, "n_ctx": n_ctx, "kv_unified": True}, args)
            if args.no_share:
                res["continuous_no_share_prefix"] = run_collect(
                    work, d / "noshare", {**top["options"], "share_prefix": False}, args)
            if args.repeat:
                again = run_collect(work, d / "again", dict(top["options"]), args)
                res["repeat_identical_texts"] = same(top, again)
        res["per_prompt"] = per_prompt
        res["continuous"] = cont
        res["identical_texts_prompt_vs_continuous"] = [same(per_prompt, c) for c in cont]
        res["best_decode_limit"] = best["tok_per_s"]
        res["ratio_per_prompt"] = round(per_prompt["tok_per_s"] / best["tok_per_s"], 3)
        res["ratio_continuous"] = [round(c["tok_per_s"] / best["tok_per_s"], 3) for c in cont]
        # prompt tokens cost about as much as decoded ones on a CPU, and the decode limit has none:
        # (prompt + generated tokens) / s against the limit says how busy the pool keeps the model
        res["ratio_continuous_with_prompts"] = [round(c["with_prompts_tok_per_s"] / best["tok_per_s"], 3) for c in cont]
        if args.no_share:
            ns = res["continuous_no_share_prefix"]
            ns["ratio"] = round(ns["tok_per_s"] / best["tok_per_s"], 3)
        if args.unified:
            u = res["continuous_unified_kv"]
            u["ratio"] = round(u["tok_per_s"] / best["tok_per_s"], 3)
        extra = [res["continuous_no_share_prefix"]] if args.no_share else []
        for r in [per_prompt, *cont, *extra] + ([again] if args.repeat else []) + ([u] if args.unified else []):
            r.pop("_texts", None)
        record["workloads"][name] = res
        print(f"\n{name}: {args.prompts} prompts x {args.n}, max_new_tokens {args.max_new_tokens}, {args.threads} threads")
        print(f"{'what':34} {'S':>4} {'tokens':>7} {'s':>7} {'tok/s':>7} {'/limit':>7}")
        for r in res["decode_limit"]:
            print(f"{'decode limit':34} {r['slots']:>4} {r['tokens']:>7} {r['seconds']:>7} {r['tok_per_s']:>7}")
        print(f"{'collect, one prompt at a time':34} {'':>4} {per_prompt['tokens']:>7} {per_prompt['seconds']:>7} "
              f"{per_prompt['tok_per_s']:>7} {res['ratio_per_prompt']:>7}")
        for s, c, q, qp in zip(args.slots, cont, res["ratio_continuous"], res["ratio_continuous_with_prompts"],
                               strict=True):
            print(f"{'collect, continuous batching':34} {s:>4} {c['tokens']:>7} {c['seconds']:>7} {c['tok_per_s']:>7} {q:>7}"
                  f"   (with its {c['prompt_tokens']} prompt tokens: {c['with_prompts_tok_per_s']} tok/s, {qp})")
        if args.no_share:
            print(f"{'collect, continuous, share_prefix off':34} {'':>4} {ns['tokens']:>7} {ns['seconds']:>7} "
                  f"{ns['tok_per_s']:>7} {ns['ratio']:>7}")
        if args.unified:
            print(f"{'collect, continuous, unified KV':34} {max(args.slots):>4} {u['tokens']:>7} {u['seconds']:>7} "
                  f"{u['tok_per_s']:>7} {u['ratio']:>7}")
        print("identical texts, one-at-a-time vs continuous:", res["identical_texts_prompt_vs_continuous"],
              *(["; repeat:", res["repeat_identical_texts"]] if args.repeat else []))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
