"""Tiny random GGUF models for tests: written here from a transformers model, no download.

`tiny_pair(out, arch)` builds a random Qwen2 or Llama model in transformers and writes the same
weights as an F32 GGUF file that llama.cpp loads, with llama.cpp's tensor names (gguf's own name
map) and, for Llama, q/k rows permuted as llama.cpp's converter permutes them (llama.cpp's
"normal" rope pairs neighbouring dimensions, transformers' rotate_half pairs the two halves). The
vocabulary is GPT-2's 256 byte symbols, one merge (" t": llama.cpp's BPE loader wants a merges
list) and three special tokens, so texts tokenise (nearly) byte by byte.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = 0
    out = {}
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def tokens() -> list[str]:
    """The vocabulary: 256 bytes, the one merge's result, the special tokens."""
    return byte_symbols() + ["Ġt", *SPECIALS]


def qk_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's row order for a Llama q/k weight [out, ...] (halves -> pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_model(arch: str, seed: int, layers: int = 4) -> Any:
    import torch
    import transformers

    vocab = len(tokens())
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                  bos_token_id=257, eos_token_id=259)
    cfg = transformers.Qwen2Config(**common) if arch == "qwen2" else transformers.LlamaConfig(**common)
    g = torch.Generator().manual_seed(seed)
    model = (transformers.Qwen2ForCausalLM if arch == "qwen2" else transformers.LlamaForCausalLM)(cfg).eval()
    with torch.no_grad():  # larger than the default init, so the next-token distributions are not flat
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else noise * (0.05 if p.ndim == 1 else 0.15))
    return model


def write_gguf(model: Any, out: Path, arch: str) -> Path:
    import gguf

    cfg = model.config
    n_blocks = cfg.num_hidden_layers
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], n_blocks)
    w = gguf.GGUFWriter(str(out), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(n_blocks)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None)
                         else float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens())
    w.add_token_types([gguf.TokenType.NORMAL] * 257 + [gguf.TokenType.CONTROL] * len(SPECIALS))
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_add_bos_token(False)
    for name, t in model.state_dict().items():
        data = t.detach().float().numpy().copy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            data = qk_permute(data, heads)
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise KeyError(f"no GGUF name for {name}")
        w.add_tensor(target, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def tiny_pair(out: Path, arch: str = "qwen2", seed: int = 0) -> tuple[Any, Path]:
    """(the transformers model, its GGUF file at `out`)."""
    model = tiny_model(arch, seed)
    return model, write_gguf(model, out, arch)
