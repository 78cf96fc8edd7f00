"""Where the llama.cpp pool's time goes when it samples a REINFORCE step or an evaluation (issue 19).

    python benchmarks/rl/sample_profile.py [--prompts 20] [--lora runs/rl/oracle/adapter.gguf]

Part 1, the RL workload: --prompts MBPP-test chat prompts x 1 sample, 128 new tokens, greedy and at
temperature 1, through `generate_many` (the pool RL uses); the wall time split into prefill decodes
(prompt tokens, no outputs) and generation steps (one row a running sequence), and the mean rows a
step. Part 2, prefill alone, on the first 16 prompts: one decode per prompt vs all prompts' tokens in
shared decodes of batch_size rows vs the common prefix once (copied to every sequence) + the rest
batched. Prints a table, writes benchmarks/results/rl_sample_profile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from qprobe.catalog import BACKENDS, TASKS
from qprobe.generation.base import GenRequest, SamplingConfig, generate_many

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "mbpp" / "mbpp.jsonl"


def rl_workload(b, task, prompts, temperature: float) -> dict:
    times = {"prefill_s": 0.0, "prefill_tokens": 0, "step_s": 0.0, "steps": 0, "rows": 0}
    decode = b.decode

    def timed(items):
        t = time.perf_counter()
        decode(items)
        d = time.perf_counter() - t
        if items and not items[0][3]:  # no outputs: a prefill decode
            times["prefill_s"] += d
            times["prefill_tokens"] += len(items)
        else:
            times["step_s"] += d
            times["steps"] += 1
            times["rows"] += len(items)

    b.decode = timed
    try:
        s = SamplingConfig(temperature=temperature, top_p=1.0, max_new_tokens=128,
                           stop=tuple(getattr(task, "stop", ()) or ()), seed=0)
        reqs = [GenRequest(i, b.render(p), s, (i,)) for i, p in enumerate(prompts)]
        t0 = time.perf_counter()
        n = sum(c.n_tokens for _, comps in generate_many(b, reqs) for c in comps)
        wall = time.perf_counter() - t0
    finally:
        b.decode = decode
    return {"temperature": temperature, "wall_s": wall, "generated": n, "tok_s": n / wall,
            **times, "mean_rows": times["rows"] / max(times["steps"], 1)}


def prefill(b, prompts) -> dict:
    toks = [b.tokenize(b.render(p)) for p in prompts]
    lib, mem = b._lib, b._memory()
    pre = len(os.path.commonprefix([tuple(t) for t in toks]))
    b.set_embeddings(False)
    n = sum(len(t) - 1 for t in toks)

    def timed(fn) -> float:
        lib.llama_memory_clear(mem, True)
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def one_each():
        for s, tk in enumerate(toks):
            for st in range(0, len(tk) - 1, b.batch_size):
                b.decode([(tk[p], p, s, False) for p in range(st, min(len(tk) - 1, st + b.batch_size))])

    def rows_batched(start: int):
        rows = [(tk[p], p, s, False) for s, tk in enumerate(toks) for p in range(start, len(tk) - 1)]
        for st in range(0, len(rows), b.batch_size):
            b.decode(rows[st : st + b.batch_size])

    def shared():
        b.decode([(toks[0][p], p, 0, False) for p in range(pre)])
        for s in range(1, len(toks)):
            lib.llama_memory_seq_cp(mem, 0, s, -1, -1)
        rows_batched(pre)

    timed(one_each)  # warm the model's pages
    got = {"prompts": len(toks), "tokens": n, "common_prefix": pre,
           "one_decode_per_prompt_s": timed(one_each), "batched_s": timed(lambda: rows_batched(0)),
           "shared_prefix_s": timed(shared)}
    lib.llama_memory_clear(mem, True)
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--lora", default=None, help="a GGUF LoRA adapter to sample with (e.g. a run's adapter.gguf)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rl_sample_profile.json"))
    a = ap.parse_args()
    task = TASKS.create("mbpp", data=str(DATA), prompt_format="chat")
    prompts = task.prompts("test")[: a.prompts]
    b = BACKENDS.create("llamacpp", **({"lora": a.lora} if a.lora else {}))
    try:
        work = [rl_workload(b, task, prompts, t) for t in (0.0, 1.0)]
        pre = prefill(b, prompts[:16])
    finally:
        b.close()
    print(f"{'temperature':>11} {'wall s':>7} {'tokens':>6} {'tok/s':>6} {'prefill s':>9} {'prompt tok':>10} "
          f"{'steps s':>7} {'rows/step':>9}")
    for w in work:
        print(f"{w['temperature']:>11.1f} {w['wall_s']:>7.1f} {w['generated']:>6} {w['tok_s']:>6.1f} "
              f"{w['prefill_s']:>9.1f} {w['prefill_tokens']:>10} {w['step_s']:>7.1f} {w['mean_rows']:>9.1f}")
    print(f"prefill of {pre['prompts']} prompts ({pre['tokens']} tokens, common prefix {pre['common_prefix']}): "
          f"one decode each {pre['one_decode_per_prompt_s']:.2f} s, batched {pre['batched_s']:.2f} s, "
          f"shared prefix + batched {pre['shared_prefix_s']:.2f} s")
    Path(a.out).write_text(json.dumps({"command": "python benchmarks/rl/sample_profile.py", "lora": a.lora,
                                       "rl_workload": work, "prefill": pre}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
