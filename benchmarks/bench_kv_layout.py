"""KV layout and flash attention vs decode speed at long contexts (RESULTS.md, "Continuous batching").

S sequences share a 200-token prompt, then FILL decode steps, then 24 timed steps (no sampler):

    python benchmarks/bench_kv_layout.py S UNIFIED(0|1) FILL FLASH(-1 auto|0 off|1 on)
    python benchmarks/bench_kv_layout.py 16 1 250 -1   # one unified cache, flash attention auto
    python benchmarks/bench_kv_layout.py 16 0 250 0    # a stream a sequence, flash attention off
"""

from __future__ import annotations

import sys
import time

from qprobe.generation.llamacpp import LlamaCppBackend


def main() -> None:
    slots, unified, fill, flash = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
    b = LlamaCppBackend(n_ctx=max(4096, slots * (fill + 240) + 512), n_seq_max=slots, n_threads=2)
    lib = b._lib
    lib.llama_free(b._ctx)  # the same weights, a context with the settings under test
    cp = lib.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = b._n_ctx_asked, b.batch_size, b.batch_size, slots
    cp.n_threads = cp.n_threads_batch = 2
    cp.kv_unified, cp.embeddings, cp.flash_attn_type = unified, True, flash
    cp.pooling_type = lib.LLAMA_POOLING_TYPE_NONE
    b._ctx = lib.llama_init_from_model(b._model, cp)
    toks = b.prompt_tokens("def f(x):\n    return x\n" * 20)[:200]
    lib.llama_memory_clear(b._memory(), True)
    b.set_embeddings(False)
    b.decode([(t, p, 0, False) for p, t in enumerate(toks)])
    for s in range(1, slots):
        lib.llama_memory_seq_cp(b._memory(), 0, s, -1, -1)
    b.set_embeddings(True)
    pos = len(toks)
    for _ in range(fill):
        b.decode([(100 + s, pos, s, True) for s in range(slots)])
        pos += 1
    t0 = time.perf_counter()
    for _ in range(24):
        b.decode([(100 + s, pos, s, True) for s in range(slots)])
        pos += 1
    dt = time.perf_counter() - t0
    print(f"S={slots} unified={unified} fill={fill} flash={flash}: {slots * 24 / dt:.1f} tok/s")
    b.close()


if __name__ == "__main__":
    main()
