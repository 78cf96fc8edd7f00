"""Sampling the LoRA policy on llama.cpp: decode speed with and without the adapter, in one run.

The default model (Q4_K_M) with a random adapter on its top 4 blocks (r 16, alpha 32, the
RM/policy defaults) exported by `qprobe.rm.gguf_adapter.export_gguf_lora`. On one back-end
(n_seq_max = --slots, the collection's context: a KV stream a sequence), --slots sequences share a
chat prompt and decode --steps tokens each (llama.cpp's temperature-1 sampler, end-of-text
ignored, so every round decodes the same number of tokens); rounds alternate base / adapter
(`set_lora`) --rounds times, so a load change on a shared machine hits both alike. Reports decode
tok/s of each and their ratio (wall and, robust on a shared machine with --threads 1, per CPU
second), the export's seconds (adapter state -> GGUF file, best of 3) and
`set_lora`'s (llama.cpp loading the file).

    nice -n 19 python benchmarks/bench_lora.py --slots 16 --steps 24 --rounds 2 --threads 1

Writes benchmarks/results/lora.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Write a Python function that returns the n-th Fibonacci number, with a docstring and tests."


def decode_round(b, text: str, slots: int, steps: int, seed: int) -> dict:
    from qprobe.generation.base import SamplingConfig

    lib = b._lib
    tokens = b.prompt_tokens(text)
    b.evaluate_prompt(tokens, slots, want_state=False)
    b.set_embeddings(False)
    samplers = [b._sampler(SamplingConfig(temperature=1.0), seed + s) for s in range(slots)]
    rows = [0] * slots
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(steps):
        feed = [(int(lib.llama_sampler_sample(samplers[s], b._ctx, rows[s])), len(tokens) + step, s, True)
                for s in range(slots)]
        b.decode(feed)
        rows = list(range(slots))
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    for smp in samplers:
        lib.llama_sampler_free(smp)
    return {"tokens": slots * steps, "seconds": round(dt, 3), "tok_per_s": round(slots * steps / dt, 2),
            "cpu_seconds": round(cpu, 3), "tok_per_cpu_s": round(slots * steps / cpu, 2) if cpu > 0 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "lora.json")
    args = ap.parse_args()

    import torch

    from qprobe.core.types import Prompt
    from qprobe.generation import models
    from qprobe.generation.hf_load import load_causal_lm
    from qprobe.generation.llamacpp import LlamaCppBackend
    from qprobe.rm.gguf_adapter import export_gguf_lora
    from qprobe.rm.trunk import LoraSettings, Trunk

    load_before = os.getloadavg()
    path = models.default_model_path()
    lm = load_causal_lm(str(path), dtype="float32", device="cpu")
    trunk = Trunk(lm, LoraSettings(top_blocks=4, r=16, alpha=32.0), seed=0)
    g = torch.Generator().manual_seed(1)
    trunk.load_adapter_state({k: torch.randn(v.shape, generator=g) * 0.02 for k, v in trunk.adapter_state().items()})
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter.gguf"
        export_s, export_cpu = [], []
        for _ in range(3):  # each a whole export: adapter state, base GGUF's metadata, write, fsync
            t0, c0 = time.perf_counter(), time.process_time()
            export_gguf_lora(trunk, adapter)
            export_s.append(time.perf_counter() - t0)
            export_cpu.append(time.process_time() - c0)
        print(f"export seconds: {[round(x, 3) for x in export_s]} (cpu {[round(x, 3) for x in export_cpu]})", flush=True)
        size = adapter.stat().st_size
        b = LlamaCppBackend(n_seq_max=args.slots, n_threads=args.threads)
        try:
            text = b.render(Prompt(id="p", text="", messages=({"role": "user", "content": PROMPT},)))
            rounds: dict[str, list[dict]] = {"base": [], "lora": []}
            set_s: list[float] = []
            for r in range(args.rounds):
                for name in ("base", "lora"):
                    t0 = time.perf_counter()
                    b.set_lora(adapter if name == "lora" else None)
                    if name == "lora":
                        set_s.append(time.perf_counter() - t0)
                    rounds[name].append(decode_round(b, text, args.slots, args.steps, seed=100 * r))
                    print(f"round {r} {name}: {rounds[name][-1]}", flush=True)
                    if rounds["lora"]:  # partial results survive a kill
                        report(args, rounds, export_s, export_cpu, set_s, size, load_before, complete=False)
        finally:
            b.close()
    report(args, rounds, export_s, export_cpu, set_s, size, load_before, complete=True)


def report(args: argparse.Namespace, rounds: dict, export_s: list, export_cpu: list, set_s: list, size: int,
           load_before: tuple, complete: bool) -> None:
    from qprobe.core.files import write_json_atomic

    def total(name: str) -> float:
        return sum(x["tokens"] for x in rounds[name]) / sum(x["seconds"] for x in rounds[name])

    base, lora = total("base"), total("lora")
    result = {
        "command": f"nice -n 19 python benchmarks/bench_lora.py --slots {args.slots} --steps {args.steps} "
                   f"--rounds {args.rounds}" + (f" --threads {args.threads}" if args.threads else ""),
        "complete": complete,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_before": load_before,
                    "load_after": os.getloadavg(),
                    "note": "shared machine (other agents' jobs and a timing job at nice 0), run under nice -n 19"},
        "adapter": {"top_blocks": 4, "r": 16, "alpha": 32.0, "tensors": 2 * 7 * 4, "bytes": size},
        "slots": args.slots, "steps": args.steps, "threads": args.threads, "rounds": rounds,
        "tok_per_s": {"base": round(base, 2), "lora": round(lora, 2)},
        "ratio_lora_over_base": round(lora / base, 3),
        "export_seconds_best_of_3": round(min(export_s), 3), "export_seconds": [round(x, 3) for x in export_s],
        "export_cpu_seconds": [round(x, 3) for x in export_cpu],
        "tok_per_cpu_s": {k: round(sum(x["tokens"] for x in v) / sum(x["cpu_seconds"] for x in v), 2)
                          for k, v in rounds.items() if v},
        "set_lora_seconds": [round(x, 3) for x in set_s],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result)
    if not complete:
        return
    print(f"{'':10} {'tok/s':>8}  rounds (tok/s)")
    for name, v in (("base", base), ("lora", lora)):
        print(f"{name:10} {v:8.1f}  {[x['tok_per_s'] for x in rounds[name]]}")
    print(f"ratio lora/base: {lora / base:.3f}; export {min(export_s):.3f} s (best of 3, {size} bytes); "
          f"set_lora {[round(x, 3) for x in set_s]} s")
    print(f"wrote {args.out}")

if __name__ == "__main__":
    main()
