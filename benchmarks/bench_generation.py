"""Generation throughput of the llama.cpp back-end on real MBPP prompts (chat form).

Compares llama-cpp-python's high-level `create_completion` (one sequence at a time) with
`LlamaCppBackend.generate` (k samples share one prompt evaluation and decode in one batch),
then times feature extraction per sample and checks reproducibility. `--collect-prompts P`
also runs the whole `collect` (generation + features + sandboxed rewards, into a fresh run) on
P MBPP test prompts and times plain `generate` on the very same prompts, seeds and sampling
settings, to give collect's share of generation throughput (target >= 0.9).

    python benchmarks/bench_generation.py --prompts 4 --max-new-tokens 128 --k 8 16
    python benchmarks/bench_generation.py --only-collect --collect-prompts 6 --k 16

Writes benchmarks/results/generation.json (a list: each run appends one record).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MBPP = REPO.parent / "shared" / "data" / "mbpp" / "mbpp_test.jsonl"


def mbpp_prompts(n: int):
    from qprobe.core.types import Prompt

    out = []
    with open(MBPP) as f:
        for line in f:
            row = json.loads(line)
            tests = "\n".join(row["test_list"])
            content = (
                f"Write a Python function for the task below.\n{row['text']}\n"
                f"Your code should pass these tests:\n{tests}\nAnswer with the code in a ```python block."
            )
            out.append(
                Prompt(id=str(row["task_id"]), text=content, messages=({"role": "user", "content": content},))
            )
            if len(out) == n:
                break
    return out


class Single:
    """llama-cpp-python's own API, one sequence at a time (its prompt-prefix cache helps it)."""

    def __init__(self, path: str, args: argparse.Namespace) -> None:
        from llama_cpp import Llama

        from qprobe.generation.llamacpp_lib import disable_extra_buffers

        disable_extra_buffers()
        self.llm = Llama(
            path, n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads, verbose=False
        )
        self.args = args

    def __call__(self, text: str, k: int) -> tuple[int, int]:
        tokens = 0
        for s in range(k):
            r = self.llm.create_completion(
                text,
                max_tokens=self.args.max_new_tokens,
                temperature=self.args.temperature,
                top_p=self.args.top_p,
                top_k=0,
                seed=s,
            )
            tokens += r["usage"]["completion_tokens"]
        return tokens, k


def batched(backend, args: argparse.Namespace):
    from qprobe.generation.base import SamplingConfig

    sc = SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)

    def run(text: str, k: int) -> tuple[int, int]:
        out = backend.generate(text, sc, list(range(k)))
        return sum(c.n_tokens for c in out), k

    return run


def bench_interleaved(backend, texts: list[str], args: argparse.Namespace) -> list[dict]:
    """Every mode on prompt 1, then every mode on prompt 2, ...: all modes see the same load."""
    single = Single(str(backend.path), args)
    ours = batched(backend, args)
    modes = [("create_completion, 1 at a time", 1, single, args.single_samples)]
    modes += [("LlamaCppBackend.generate, batched", k, ours, k) for k in [1, *args.k]]
    acc = {i: [0, 0, 0.0] for i in range(len(modes))}  # tokens, sequences, seconds
    for text in texts:
        for i, (_, _, fn, k) in enumerate(modes):
            t0 = time.perf_counter()
            tokens, seqs = fn(text, k)
            acc[i][0] += tokens
            acc[i][1] += seqs
            acc[i][2] += time.perf_counter() - t0
    single.llm.close()
    return [
        {
            "mode": name,
            "k": k,
            "sequences": acc[i][1],
            "tokens": acc[i][0],
            "seconds": round(acc[i][2], 2),
            "tok_per_s": round(acc[i][0] / acc[i][2], 1),
        }
        for i, (name, k, _, _) in enumerate(modes)
    ]


def bench_features(backend, texts: list[str], k: int, args: argparse.Namespace) -> dict:
    from qprobe.features.llamacpp import LlamaCppEmbedder
    from qprobe.features.spec import FeatureRequest
    from qprobe.generation.base import SamplingConfig

    emb = LlamaCppEmbedder(backend)
    reqs = [FeatureRequest(-1, "last"), FeatureRequest(-1, "mean")]
    sc = SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    gen = cap = ev = 0.0
    n = tokens = 0
    hf_layer = hf_s = None
    for text in texts:
        t0 = time.perf_counter()
        comps = backend.generate(text, sc, list(range(k)))
        t1 = time.perf_counter()
        emb.embed(text, comps, reqs)
        t2 = time.perf_counter()
        backend.captured.clear()  # the re-evaluation path: prompt once, then the completions' tokens
        emb.embed(text, comps, reqs)
        t3 = time.perf_counter()
        gen, cap, ev = gen + t1 - t0, cap + t2 - t1, ev + t3 - t2
        n += len(comps)
        tokens += sum(c.n_tokens for c in comps)
    out = {
        "k": k,
        "samples": n,
        "gen_tok_per_s_with_capture": round(tokens / gen, 1),
        "captured_ms_per_sample": round(1000 * cap / n, 2),
        "evaluated_ms_per_sample": round(1000 * ev / n, 1),
        "stats": dict(emb.stats),
    }
    if args.hf_layer is not None:
        t0 = time.perf_counter()
        hf = emb.transformers()
        load = time.perf_counter() - t0
        comps = backend.generate(texts[0], sc, list(range(k)))
        t1 = time.perf_counter()
        emb.embed(texts[0], comps, [FeatureRequest(args.hf_layer, "mean")])
        hf_s = time.perf_counter() - t1
        hf_layer = {
            "layer": args.hf_layer,
            "load_s": round(load, 1),
            "ms_per_sample": round(1000 * hf_s / k, 1),
            "dtype": hf.lm.dtype,
        }
        out["transformers_layer"] = hf_layer
    return out


def bench_collect(backend, args: argparse.Namespace) -> dict:
    """`collect` vs plain batched generation of the same samples (same prompts, seeds, settings)."""
    import os
    import tempfile

    from qprobe.catalog import TASKS
    from qprobe.collection.collect import CollectConfig, collect
    from qprobe.generation.base import SamplingConfig, sample_seed

    os.environ.setdefault("QPROBE_ALLOW_CODE_EXECUTION", "1")  # rewards run in the sandbox
    n, features = max(args.k), ("-1:last", "-1:mean", f"{args.collect_layer}:mean")
    task_options = {"data": str(MBPP.parent / "mbpp.jsonl"), "prompt_format": "chat"}
    task = TASKS.create("mbpp", **task_options)
    prompts = list(task.prompts("test"))[: args.collect_prompts]
    sc = SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                        stop=tuple(task.stop))
    backend.capture_states = False
    t0 = time.perf_counter()
    gen_tokens = 0
    for p in prompts:
        seeds = [sample_seed(sc.seed, p.id, j) for j in range(n)]
        gen_tokens += sum(c.n_tokens for c in backend.generate(backend.render(p), sc, seeds))
    gen_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        cfg = CollectConfig(task="mbpp", split="test", out=os.path.join(tmp, "run"), n=n, backend="llamacpp", limit=args.collect_prompts,
                            sampling=sc, features=features, task_options=task_options,
                            backend_options={"n_threads": backend.n_threads, "n_seq_max": backend.n_seq_max})
        t1 = time.perf_counter()
        run = collect(cfg, progress=False)
        collect_s = time.perf_counter() - t1
        col_tokens = int(sum(run.table(columns=["n_tokens"]).column("n_tokens").to_pylist()))
        reward = float(sum(r or 0 for r in run.table(columns=["reward"]).column("reward").to_pylist()) / len(run))
    return {
        "prompts": len(prompts),
        "samples_per_prompt": n,
        "features": list(features),
        "generate_tokens": gen_tokens,
        "generate_s": round(gen_s, 1),
        "generate_tok_per_s": round(gen_tokens / gen_s, 1),
        "collect_tokens": col_tokens,
        "collect_s_incl_model_load": round(collect_s, 1),
        "collect_tok_per_s": round(col_tokens / collect_s, 1),
        "collect_over_generate": round((col_tokens / collect_s) / (gen_tokens / gen_s), 3),
        "same_tokens": gen_tokens == col_tokens,
        "mean_reward": round(reward, 3),
    }


def bench_determinism(backend, text: str, args: argparse.Namespace) -> dict:
    from qprobe.generation.base import SamplingConfig

    sc = SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    seeds = list(range(100, 108))
    a = [c.text for c in backend.generate(text, sc, seeds)]
    b = [c.text for c in backend.generate(text, sc, seeds)]
    alone = [backend.generate(text, sc, [s])[0].text for s in seeds[:4]]
    return {
        "same_call_identical": sum(x == y for x, y in zip(a, b, strict=True)),
        "of": len(seeds),
        "alone_vs_in_batch_identical": sum(x == y for x, y in zip(alone, a[: len(alone)], strict=True)),
        "alone_of": len(alone),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF path or name (default: the packaged 0.5B model)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--k", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--single-samples", type=int, default=2)
    ap.add_argument("--feature-prompts", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--hf-layer", type=int, default=None, help="also time a transformers layer (e.g. 18)")
    ap.add_argument("--skip-determinism", action="store_true")
    ap.add_argument("--collect-prompts", type=int, default=0, help="also time collect on this many MBPP prompts")
    ap.add_argument("--collect-layer", type=int, default=12, help="intermediate layer collect also stores")
    ap.add_argument("--only-collect", action="store_true", help="skip the other measurements")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "generation.json"))
    args = ap.parse_args()

    from qprobe.generation.llamacpp import LlamaCppBackend

    t0 = time.perf_counter()
    backend = LlamaCppBackend(args.model, n_threads=args.threads, n_seq_max=max(args.k))
    load_s = time.perf_counter() - t0
    args.threads = backend.n_threads
    prompts = mbpp_prompts(args.prompts)
    texts = [backend.render(p) for p in prompts]
    coll = bench_collect(backend, args) if args.collect_prompts else None
    if coll:
        print("collect vs generate:", json.dumps(coll))
    if args.only_collect:
        _append(Path(args.out), {"command": "python benchmarks/bench_generation.py --only-collect --collect-prompts "
                                 f"{args.collect_prompts} --k {max(args.k)} --max-new-tokens {args.max_new_tokens}",
                                 "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "machine": f"{platform.machine()}, {backend.n_threads} threads", "collect": coll})
        backend.close()
        return
    rows = bench_interleaved(backend, texts, args)
    base = rows[0]["tok_per_s"]
    print(f"{'mode':40s} {'k':>3s} {'seqs':>5s} {'tokens':>7s} {'sec':>8s} {'tok/s':>7s} {'x single':>8s}")
    for r in rows:
        r["speedup_vs_single"] = round(r["tok_per_s"] / base, 2)
        print(
            f"{r['mode']:40s} {r['k']:3d} {r['sequences']:5d} {r['tokens']:7d} {r['seconds']:8.1f} "
            f"{r['tok_per_s']:7.1f} {r['speedup_vs_single']:8.2f}"
        )
    feats = bench_features(backend, texts[: args.feature_prompts], max(args.k), args)
    print("features:", json.dumps(feats))
    det = None if args.skip_determinism else bench_determinism(backend, texts[0], args)
    if det:
        print("determinism:", json.dumps(det))
    record = {
        "command": "python benchmarks/bench_generation.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k not in ("out", "skip_determinism", "only_collect") and v is not None
        ),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, {backend.n_threads} threads",
        "load_s": round(load_s, 2),
        "identity": backend.identity(),
        "rows": rows,
        "features": feats,
        "determinism": det,
        "collect": coll,
        "max_new_tokens": args.max_new_tokens,
        "prompts": [p.id for p in prompts],
    }
    _append(Path(args.out), record)
    backend.close()


def _append(out: Path, record: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    history = json.loads(out.read_text()) if out.exists() else []
    history.append(record)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(history, indent=1) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
