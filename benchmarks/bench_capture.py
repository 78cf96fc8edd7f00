"""Cost of capturing hidden states inside llama.cpp (qprobe.generation.llamacpp_capture).

One prompt is decoded once and shared by k sequences (unified KV cache, embeddings on with
pooling NONE, as the llama.cpp back-end does), then k sequences decode `--steps` tokens each,
one `llama_batch` of k rows per step (temperature 0.8, one sampler per sequence). Three
contexts on the same loaded model run side by side, fed the *same* tokens, and each step is
timed in all three in turn, so load from other processes hits them alike:

- off:        no eval callback;
- ask-only:   the callback installed but wanting nothing (the cost of the per-node "ask" calls);
- capture:    `--layers` captured at every step, `take()` after every decode (included in time).

Then the same three modes for a `--prefill`-token single-sequence evaluation (one ubatch of
512), `--repeats` times each, interleaved. Best (least disturbed) and median times are reported:
the CPU is shared, and "vs off" is time relative to no callback (negative = faster).

Usage: python benchmarks/bench_capture.py [--k 16 --steps 48 --layers 12,18,-1 --threads 1]
Writes benchmarks/results/capture.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.generation.llamacpp_capture import LayerCapture, _tokenize
from qprobe.generation.llamacpp_lib import extra_buffers_default, load
from qprobe.generation.models import default_model_path

HERE = Path(__file__).resolve().parent
PROMPT = (
    "Write a Python function `merge_intervals(intervals)` that merges overlapping intervals and "
    "returns them sorted. Explain the algorithm step by step, then give the code and three tests.\n"
)


def _context(lib: Any, model: Any, mode: str, layers: list[int], k: int, threads: int) -> tuple[Any, Any]:
    cp = lib.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 4096, 512, 512, k
    cp.n_threads = cp.n_threads_batch = threads
    cp.kv_unified, cp.embeddings, cp.pooling_type = True, True, lib.LLAMA_POOLING_TYPE_NONE
    cap = None
    if mode != "off":
        cap = (_Counting if mode == "count" else LayerCapture)(layers, int(lib.llama_model_n_layer(model)))
        cap.enabled = mode != "ask-only"
        cap.install(cp)
    return lib.llama_init_from_model(model, cp), cap


def _fill(b: Any, rows: list[tuple[int, int, int, bool]]) -> None:
    for i, (tok, pos, seq, out) in enumerate(rows):
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
        b.seq_id[i][0] = seq
    b.n_tokens = len(rows)


class _Counting(LayerCapture):
    """A capture that counts the scheduler's calls (only to report them)."""

    asks = 0
    gets = 0

    def _on_tensor(self, t: int, ask: bool, user_data: Any) -> bool:
        if ask:
            self.asks += 1
        else:
            self.gets += 1
        return super()._on_tensor(t, ask, user_data)


def _prefill_into(lib: Any, ctx: Any, b: Any, prompt: list[int], k: int) -> None:
    lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
    _fill(b, [(t, p, 0, p == len(prompt) - 1) for p, t in enumerate(prompt)])
    if lib.llama_decode(ctx, b) != 0:
        raise RuntimeError("llama_decode failed")
    for s in range(1, k):
        lib.llama_memory_seq_cp(lib.llama_get_memory(ctx), 0, s, -1, -1)


MODES = ("off", "ask-only", "capture")


def run(lib: Any, model: Any, args: argparse.Namespace, prompt: list[int], long: list[int]) -> dict:
    made = {m: _context(lib, model, m, args.layers, args.k, args.threads) for m in MODES}
    b = lib.llama_batch_init(512, 0, 1)
    samplers = []
    times: dict[str, list[float]] = {m: [] for m in MODES}
    pre: dict[str, list[float]] = {m: [] for m in MODES}
    rows_seen = 0
    try:
        for ctx, cap in made.values():
            _prefill_into(lib, ctx, b, prompt, args.k)
            if cap:
                cap.take()
        for s in range(args.k):
            ch = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
            lib.llama_sampler_chain_add(ch, lib.llama_sampler_init_temp(0.8))
            lib.llama_sampler_chain_add(ch, lib.llama_sampler_init_dist(1000 + s))
            samplers.append(ch)
        rows = [0] * args.k
        ctx0 = made["off"][0]
        for step in range(args.steps):
            toks = [int(lib.llama_sampler_sample(samplers[s], ctx0, rows[s])) for s in range(args.k)]
            order = MODES if step % 2 == 0 else MODES[::-1]
            for m in order:
                ctx, cap = made[m]
                _fill(b, [(toks[s], len(prompt) + step, s, True) for s in range(args.k)])
                t0 = time.perf_counter()
                if lib.llama_decode(ctx, b) != 0:
                    raise RuntimeError("llama_decode failed")
                if m == "capture":
                    got = cap.take()
                    rows_seen += min(v.shape[0] for v in got.values())
                times[m].append(time.perf_counter() - t0)
            rows = list(range(args.k))
        for rep in range(args.repeats):
            for m in MODES if rep % 2 == 0 else MODES[::-1]:
                ctx, cap = made[m]
                lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
                _fill(b, [(t, p, 0, True) for p, t in enumerate(long)])
                t0 = time.perf_counter()
                if lib.llama_decode(ctx, b) != 0:
                    raise RuntimeError("llama_decode failed")
                if m == "capture":
                    cap.take()
                pre[m].append(time.perf_counter() - t0)
    finally:
        for ch in samplers:
            lib.llama_sampler_free(ch)
        lib.llama_batch_free(b)
        for ctx, _ in made.values():
            lib.llama_free(ctx)
    out = {"decode_step_s": times, "prefill_s": pre, "captured_rows": rows_seen}
    # how often the scheduler calls back, per ubatch of k one-token rows
    ctx, cap = _context(lib, model, "count", args.layers, args.k, args.threads)
    b = lib.llama_batch_init(512, 0, 1)
    try:
        _prefill_into(lib, ctx, b, prompt, args.k)
        cap.asks = cap.gets = 0
        _fill(b, [(prompt[0], len(prompt), s, True) for s in range(args.k)])
        lib.llama_decode(ctx, b)
        out["asks_per_ubatch"], out["gets_per_ubatch"] = cap.asks, cap.gets
    finally:
        lib.llama_batch_free(b)
        lib.llama_free(ctx)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=[12, 18, -1])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefill", type=int, default=384)
    ap.add_argument("--out", default=str(HERE / "results" / "capture.json"))
    args = ap.parse_args()
    lib = load()
    mp = lib.llama_model_default_params()
    mp.use_extra_bufts = extra_buffers_default()
    model = lib.llama_model_load_from_file(str(default_model_path()).encode(), mp)
    prompt = _tokenize(lib, model, PROMPT)
    long = (prompt * (args.prefill // len(prompt) + 1))[: args.prefill]
    res = run(lib, model, args, prompt, long)
    lib.llama_model_free(model)
    table = []
    for m in MODES:
        step, pre = res["decode_step_s"][m], res["prefill_s"][m]
        table.append(
            {
                "mode": m,
                "decode_tok_s_best": args.k / min(step),
                "decode_tok_s_median": args.k / float(np.median(step)),
                "decode_step_ms_best": 1000 * min(step),
                "decode_step_ms_median": 1000 * float(np.median(step)),
                "prefill_tok_s_best": len(long) / min(pre),
                "prefill_tok_s_median": len(long) / float(np.median(pre)),
                "prefill_ms_best": 1000 * min(pre),
                "prefill_ms_median": 1000 * float(np.median(pre)),
            }
        )
    base = table[0]
    print(
        f"k={args.k} steps={args.steps} layers={args.layers} threads={args.threads} prefill={len(long)}; "
        f"scheduler calls per ubatch: {res['asks_per_ubatch']} asks, {res['gets_per_ubatch']} hand-overs"
    )
    print(
        f"{'mode':10s} {'decode tok/s best/median':>25s} {'vs off':>15s} {'prefill tok/s best/median':>26s} {'vs off':>15s}"
    )
    for row in table:
        rel = [
            row[f"{a}_{b}"] / base[f"{a}_{b}"] - 1
            for a in ("decode_step_ms", "prefill_ms")
            for b in ("best", "median")
        ]
        print(
            f"{row['mode']:10s} {row['decode_tok_s_best']:12.1f} / {row['decode_tok_s_median']:10.1f} "
            f"{rel[0]:+7.1%}/{rel[1]:+7.1%} {row['prefill_tok_s_best']:12.1f} / {row['prefill_tok_s_median']:11.1f} "
            f"{rel[2]:+7.1%}/{rel[3]:+7.1%}"
        )
    out = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "table": table, **res}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
