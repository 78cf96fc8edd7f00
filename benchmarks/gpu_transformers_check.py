"""The transformers back-end on CPU and on CUDA: same random-weight Qwen2, same prompts, compared.

What a GPU machine that can neither install packages nor download a model can check: everything
here is built in the script (a byte-level tokenizer with no merges, 256 bytes + <|endoftext|>, and a
`transformers.Qwen2Config` with random weights from a fixed seed, saved to a temporary folder) and
runs through qprobe's own `load_causal_lm`, `TransformersBackend` and `TransformersEmbedder`. Needs
torch and transformers only (and qprobe's src/ on the path, which the script adds).

Runs: cpu float32 (the reference), cpu bfloat16, and cuda float32 and bfloat16 when
`torch.cuda.is_available()`; each against the reference:
- greedy texts of every prompt (k rows decoded as one batch) against cpu float32's, equal or not;
- the features (`-1:last`, `L/2:mean`, `1:tokens`) of cpu float32's greedy completions, so both
  devices embed the same tokens; max |a - b| / max |a| per feature against cpu float32;
- timing: sampled generation (k per prompt, per-sample seeds, temperature 0.8) in new tokens/s,
  and embedding in samples/s. Sampled texts are not compared: a CPU and a CUDA torch.Generator
  draw different streams from the same seed.
Tolerance: float32 features within 1e-4 (relative to the feature's largest magnitude); bfloat16
within 5e-2; greedy texts must be equal in float32 (bfloat16's are reported, not required).

Usage: python benchmarks/gpu_transformers_check.py [--hidden 128 --layers 4 --prompts 4 --k 8
       --tokens 48 --threads 1] [--out benchmarks/results/gpu_transformers.json]
Prints a table and writes the JSON. Asserts nothing about time (a benchmark, not a test); exits 1
when a correctness check fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

PROMPTS = [
    "def add(a, b):\n",
    "Write a function that reverses a string.\n",
    "# sum of squares\nfor i in range(10):\n",
    "The quick brown fox",
    "import numpy as np\nx = np.",
    "SELECT name FROM users WHERE",
    "class Stack:\n    def __init__(self):\n",
    "Q: What is 12 * 7?\nA:",
]
TOL = {"float32": 1e-4, "bfloat16": 5e-2}


def build_model(folder: Path, hidden: int, layers: int, seed: int) -> dict[str, Any]:
    """A random-weight Qwen2 and a byte-level tokenizer saved to `folder` (nothing downloaded)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")
    heads = max(1, hidden // 32)
    cfg = transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=1024,
        eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=True, initializer_range=0.1,
    )  # fmt: skip
    from qprobe.core.verbosity import quiet_transformers

    quiet_transformers()
    torch.manual_seed(seed)  # the script's own process: the weights are a function of the seed
    model = transformers.Qwen2ForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    n_params = sum(p.numel() for p in model.parameters())
    return {"hidden": hidden, "layers": layers, "heads": heads, "vocab": len(tok), "params": n_params, "seed": seed}


def run_device(folder: Path, device: str, dtype: str, args: argparse.Namespace,
               reference: list[list[Any]] | None) -> dict[str, Any]:
    import torch

    from qprobe.features.hf import TransformersEmbedder
    from qprobe.features.spec import FeatureRequest
    from qprobe.generation.base import SamplingConfig, sample_seed
    from qprobe.generation.hf import TransformersBackend
    from qprobe.generation.hf_load import load_causal_lm

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    lm = load_causal_lm(str(folder), dtype=dtype, device=device)
    backend = TransformersBackend(lm=lm, chat=False)
    emb = TransformersEmbedder(backend)
    sync()
    load_s = time.perf_counter() - t0
    prompts = PROMPTS[: args.prompts]
    greedy_cfg = SamplingConfig(temperature=0.0, max_new_tokens=args.tokens)
    greedy = [backend.generate(p, greedy_cfg, [0] * args.k) for p in prompts]
    sampled_cfg = SamplingConfig(temperature=0.8, top_p=0.95, max_new_tokens=args.tokens)
    backend.generate(prompts[0], sampled_cfg, [1])  # warm-up (CUDA kernels, allocator)
    sync()
    t0 = time.perf_counter()
    sampled = [backend.generate(p, sampled_cfg, [sample_seed(0, str(i), j) for j in range(args.k)])
               for i, p in enumerate(prompts)]
    sync()
    gen_s = time.perf_counter() - t0
    n_tok = sum(c.n_tokens for comps in sampled for c in comps)
    mid = max(1, args.layers // 2)
    reqs = [FeatureRequest(-1, "last"), FeatureRequest(mid, "mean"), FeatureRequest(1, "tokens")]
    comps_to_embed = reference or greedy  # every device embeds cpu float32's greedy completions
    emb.embed(prompts[0], comps_to_embed[0][:1], reqs)  # warm-up
    sync()
    t0 = time.perf_counter()
    feats = [emb.embed(p, comps_to_embed[i], reqs) for i, p in enumerate(prompts)]
    sync()
    emb_s = time.perf_counter() - t0
    n_emb = sum(len(c) for c in comps_to_embed)
    return {
        "device": device, "dtype": dtype, "load_s": load_s,
        "gen_tokens": n_tok, "gen_s": gen_s, "gen_tok_per_s": n_tok / gen_s,
        "embed_samples": n_emb, "embed_s": emb_s, "embed_samples_per_s": n_emb / emb_s,
        "_greedy": greedy, "_features": feats,
        "greedy_rows_identical_within_prompt": all(len({c.text for c in g}) == 1 for g in greedy),
    }  # fmt: skip


def compare(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    """Greedy texts equal (per prompt, first row) and feature differences, against cpu float32."""
    import numpy as np

    equal = [a[0].text == b[0].text for a, b in zip(ref["_greedy"], got["_greedy"], strict=True)]
    first_diff = []
    for a, b, same in zip(ref["_greedy"], got["_greedy"], equal, strict=True):
        if not same:
            x, y = a[0].text, b[0].text
            first_diff.append(next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), min(len(x), len(y))))
    rel: dict[str, float] = {}
    for fa, fb in zip(ref["_features"], got["_features"], strict=True):
        for key in fa:
            a = np.concatenate([np.asarray(r).reshape(-1) for r in fa[key]])
            b = np.concatenate([np.asarray(r).reshape(-1) for r in fb[key]])
            err = float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))
            rel[key] = max(rel.get(key, 0.0), err)
    tol = TOL[got["dtype"]]
    ok = max(rel.values()) <= tol and (got["dtype"] != "float32" or all(equal))
    return {"greedy_equal": sum(equal), "greedy_prompts": len(equal), "greedy_first_diff_chars": first_diff,
            "feature_rel_err": rel, "tolerance": tol, "pass": ok}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4, choices=range(1, len(PROMPTS) + 1))
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadiest on a shared machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gpu_transformers.json")
    args = ap.parse_args()
    try:
        import torch
        import transformers
    except ImportError as exc:
        print(f"expected torch and transformers installed, got: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="qprobe-gpu-check-") as tmp:
        model = build_model(Path(tmp), args.hidden, args.layers, args.seed)
        runs["cpu/float32"] = run_device(Path(tmp), "cpu", "float32", args, None)
        ref = runs["cpu/float32"]
        runs["cpu/bfloat16"] = run_device(Path(tmp), "cpu", "bfloat16", args, ref["_greedy"])
        if cuda:
            for dtype in ("float32", "bfloat16"):
                runs[f"cuda/{dtype}"] = run_device(Path(tmp), "cuda", dtype, args, ref["_greedy"])
    checks = {name: compare(ref, r) for name, r in runs.items() if name != "cpu/float32"}
    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cpu_threads": args.threads, "cuda": torch.cuda.get_device_name(0) if cuda else None,
           "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32) if cuda else None}
    result = {
        "model": model, "prompts": args.prompts, "k": args.k, "max_new_tokens": args.tokens, "env": env,
        "runs": {n: {k: v for k, v in r.items() if not k.startswith("_")} for n, r in runs.items()},
        "checks": checks,
        "gpu": "run" if cuda else "not run: torch.cuda.is_available() is False on this machine",
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"random Qwen2: hidden {model['hidden']}, {model['layers']} blocks, {model['params']:,} parameters; "
          f"{args.prompts} prompts x k={args.k}, {args.tokens} new tokens")
    print(f"{'run':<14} {'load s':>7} {'gen tok/s':>10} {'embed samples/s':>16} {'greedy = cpu':>13} {'max rel err':>12} {'tol':>7}")
    for name, r in runs.items():
        c = checks.get(name)
        eq = f"{c['greedy_equal']}/{c['greedy_prompts']}" if c else "(reference)"
        err = f"{max(c['feature_rel_err'].values()):.1e}" if c else "-"
        tol = f"{c['tolerance']:.0e}" if c else "-"
        print(f"{name:<14} {r['load_s']:>7.2f} {r['gen_tok_per_s']:>10.1f} {r['embed_samples_per_s']:>16.1f} {eq:>13} {err:>12} {tol:>7}")
    if not cuda:
        print("cuda: not run (torch.cuda.is_available() is False)")
    print(f"wrote {args.out}")
    return 0 if all(c["pass"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
