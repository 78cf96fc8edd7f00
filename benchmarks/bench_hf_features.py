"""Hidden-state features through transformers: the paper's approach vs qprobe's.

Same model (default: the packaged Qwen2.5-Coder-0.5B GGUF, dequantised and cached), same MBPP
prompts (chat template), same number of samples and new tokens, bf16 on CPU:

- paper:      `model.generate(..., output_hidden_states=True, return_dict_in_generate=True)`
              for k copies of the prompt, keeping the chosen layer of every step afterwards;
- hf-plain:   the same `generate` without hidden states (what the features cost on top);
- ours:       `TransformersBackend.generate` (prompt evaluated once, k rows, per-sample seeds)
              then `TransformersEmbedder` (one batched second pass, prompt cache shared,
              stopped after the chosen layer);
- ours-full:  the same with the second pass over k full prompt+completion rows.

Each method runs in its own subprocess so that peak memory (ru_maxrss) is its own.
Usage: python benchmarks/bench_hf_features.py [--prompts 4 --k 4 --tokens 64 --layer 18 --threads 1]
Writes benchmarks/results/hf.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "mbpp" / "mbpp_test.jsonl"
METHODS = ("paper", "hf-plain", "ours", "ours-full")


def _prompts(n: int) -> list[dict]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:n]]
    return [
        {
            "id": str(r["task_id"]),
            "content": f"{r['text']}\nYour code should pass this test:\n{r['test_list'][0]}",
        }
        for r in rows
    ]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(method: str, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from qprobe.core.types import Prompt
    from qprobe.features.hf import TransformersEmbedder
    from qprobe.features.spec import FeatureRequest
    from qprobe.generation.base import SamplingConfig, sample_seed
    from qprobe.generation.hf import TransformersBackend
    from qprobe.generation.hf_load import encode_prompt

    t0 = time.perf_counter()
    backend = TransformersBackend(args.model, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    with torch.inference_mode():  # touch every weight (safetensors are mapped lazily) before the baseline
        backend.lm.model(input_ids=torch.tensor([[1, 2, 3]]))
    rss_loaded = _rss_mb()
    sampling = SamplingConfig(temperature=0.8, top_p=0.95, max_new_tokens=args.tokens, seed=0)
    reqs = [FeatureRequest(args.layer, "last")]
    model, tok = backend.lm.model, backend.tokenizer
    gen_s = feat_s = 0.0
    n_tokens = 0
    for p in _prompts(args.prompts):
        text = backend.render(
            Prompt(id=p["id"], text=p["content"], messages=({"role": "user", "content": p["content"]},))
        )
        seeds = [sample_seed(0, p["id"], i) for i in range(args.k)]
        if method.startswith("ours"):
            t = time.perf_counter()
            comps = backend.generate(text, sampling, seeds)
            gen_s += time.perf_counter() - t
            emb = TransformersEmbedder(backend, share_prompt=(method == "ours"))
            t = time.perf_counter()
            feats = emb.embed(text, comps, reqs)
            feat_s += time.perf_counter() - t
            assert feats[reqs[0].key].shape[0] == args.k
            n_tokens += sum(c.n_tokens for c in comps)
        else:
            ids = torch.tensor([encode_prompt(tok, text)] * args.k)  # [k, P]: same prompt, no padding
            torch.manual_seed(seeds[0])
            t = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    temperature=0.8,
                    top_p=0.95,
                    max_new_tokens=args.tokens,
                    pad_token_id=tok.pad_token_id,
                    output_hidden_states=(method == "paper"),
                    return_dict_in_generate=True,
                )
                if method == "paper":  # keep the chosen layer at each sample's last generated token
                    layer = args.layer
                    steps = out.hidden_states  # tuple over steps of tuples over layers [k, t, d]
                    seq = out.sequences[:, ids.shape[1] :]  # [k, T]
                    done = (seq == tok.pad_token_id) | torch.isin(seq, torch.tensor(sorted(backend.eos_ids)))
                    lens = torch.where(done.any(1), done.float().argmax(1), torch.tensor(seq.shape[1]))
                    feats = torch.stack(
                        [steps[min(int(n), len(steps) - 1)][layer][i, -1] for i, n in enumerate(lens)]
                    ).float()  # [k, d]
                    assert feats.shape[0] == args.k
            gen_s += time.perf_counter() - t
            seq = out.sequences[:, ids.shape[1] :]
            stop = torch.isin(seq, torch.tensor(sorted(backend.eos_ids)))
            n_tokens += int(
                torch.where(stop.any(1), stop.float().argmax(1), torch.tensor(seq.shape[1])).sum()
            )
    return {
        "method": method,
        "load_s": round(load_s, 2),
        "generate_s": round(gen_s, 2),
        "features_s": round(feat_s, 2),
        "total_s": round(gen_s + feat_s, 2),
        "new_tokens": n_tokens,
        "rss_after_load_mb": round(rss_loaded),
        "peak_rss_mb": round(_rss_mb()),
        "peak_over_load_mb": round(_rss_mb() - rss_loaded),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--layer", type=int, default=18)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    results = []
    for m in args.methods.split(","):
        cmd = [sys.executable, __file__, "--one", m] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("one", "methods")
        ]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode:
            sys.exit(f"{m} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{m:10s} generate {r['generate_s']:7.2f} s  features {r['features_s']:6.2f} s  total "
              f"{r['total_s']:7.2f} s  tokens {r['new_tokens']:4d}  peak RSS over load {r['peak_over_load_mb']} MB",
              flush=True)  # fmt: skip
    out = {"config": {k: v for k, v in vars(args).items() if k != "one"}, "cpu_count": os.cpu_count(),
           "load_avg_at_end": os.getloadavg(), "results": results}  # fmt: skip
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "hf.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
