"""A trunk's LoRA adapter as a llama.cpp GGUF adapter file, so the batched llama.cpp back-end can
sample the updated policy (`LlamaCppBackend(lora=PATH)` / `set_lora(PATH)`).

The file llama.cpp's adapter loader reads (src/llama-adapter.cpp): metadata general.type =
"adapter", general.architecture = the base model's, adapter.type = "lora", adapter.lora.alpha;
for every adapted weight `W` [out, in] named `<name>.weight` in the base GGUF, two tensors
`<name>.weight.lora_a` = peft's lora_A [r, in] and `<name>.weight.lora_b` = lora_B [out, r], as
they are (GGUF stores them reversed: ne = [in, r] and [r, out], which the loader checks against
W's ne = [in, out]). llama.cpp computes W x + scale * alpha / r * B (A x), peft W x + alpha / r *
B (A x), so scale 1 is peft's adapter. Names come from gguf's own map (`TensorNameMap`: e.g.
model.layers.20.self_attn.q_proj -> blk.20.attn_q).

Llama-architecture GGUFs store q/k rows permuted (llama.cpp's converter pairs neighbouring
dimensions for its rope, transformers' rotate_half pairs the halves; transformers undoes it when it
loads such a GGUF), so lora_B of q/k gets the same row permutation: permuting the rows of B permutes
the rows of B A. Architectures are accepted only where that choice is checked (`ARCHS`).

Files are F32 and written atomically (qprobe.core.files). `export_gguf_lora(trunk, out)` takes the
trunk's current adapters; `export_lora_state(state, alpha, out, base_gguf)` a saved adapter state
(peft's state dict, as `Trunk.adapter_state()` or the "adapter.*" tensors of a reward-model file).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qprobe.core.files import write_path_atomic
from qprobe.errors import ConfigError, DataError, require

if TYPE_CHECKING:
    from qprobe.rm.trunk import Trunk

# architecture -> whether its GGUF q/k rows are permuted by llama.cpp's converter (tests/test_gguf_adapter.py)
ARCHS = {"qwen2": False, "llama": True}
_KEY = re.compile(r"^(?:adapter\.)?(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


@dataclass(frozen=True)
class BaseFacts:
    """What the export needs from the base GGUF: architecture, blocks, heads, tensor shapes (ne)."""

    arch: str
    n_blocks: int
    n_head: int
    n_head_kv: int
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def read(cls, path: str | Path) -> BaseFacts:
        """The facts of the GGUF at `path`, parsed once per file version (gguf's reader takes about
        12 s on the default model, most of it the vocabulary; REINFORCE exports an adapter a step)."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"expected the base model's GGUF file, got nothing at '{p}'; pass base_gguf=PATH")
        st = p.stat()
        return cls._read(str(p.resolve()), st.st_size, st.st_mtime_ns)

    @classmethod
    @functools.lru_cache(maxsize=4)
    def _read(cls, path: str, size: int, mtime_ns: int) -> BaseFacts:  # size, mtime: the cache key only
        gguf = require("gguf", "rm")
        p = Path(path)
        try:
            reader = gguf.GGUFReader(str(p))
        except (ValueError, OSError) as exc:
            raise DataError(f"expected a readable GGUF file at '{p}', got: {exc}") from exc

        def value(key: str, default: Any = None) -> Any:
            field = reader.fields.get(key)
            return default if field is None else field.contents()

        arch = str(value("general.architecture", ""))
        n_head = int(value(f"{arch}.attention.head_count", 0))
        return cls(arch=arch, n_blocks=int(value(f"{arch}.block_count", 0)), n_head=n_head,
                   n_head_kv=int(value(f"{arch}.attention.head_count_kv", n_head)),
                   shapes={t.name: tuple(int(x) for x in t.shape) for t in reader.tensors})


def qk_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's q/k row order applied to the rows of b [out, r]: within each head,
    rows (i, i + half) become neighbours (2i, 2i + 1)."""
    out = b.shape[0]
    if out % (2 * n_head):
        raise DataError(f"expected q/k rows divisible by 2 x {n_head} heads, got {out}")
    return b.reshape(n_head, 2, out // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)  # [out, r]


def _pairs(state: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """{module name: {"A": [r, in], "B": [out, r]}} from peft's state dict keys."""
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, t in state.items():
        m = _KEY.match(key)
        if m is None:
            if key.startswith("head."):
                continue  # a reward model's head, not part of the policy
            raise DataError(f"expected peft LoRA tensors '<module>.lora_A.weight' / '.lora_B.weight', got '{key}'")
        arr = t.detach().to("cpu").float().numpy() if hasattr(t, "detach") else np.asarray(t, np.float32)
        pairs.setdefault(m["module"], {})[m["ab"]] = np.ascontiguousarray(arr, dtype=np.float32)
    if not pairs:
        raise DataError("expected at least one LoRA A/B pair in the adapter state, got none")
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise DataError(f"expected both lora_A and lora_B of '{module}', got only lora_{''.join(ab)}")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise DataError(f"expected lora_A [r, in] and lora_B [out, r] of '{module}', got {a.shape} and {b.shape}")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise DataError(f"expected finite adapter values, got NaN/inf in '{module}'; the training diverged")
    return pairs


def export_lora_state(state: Mapping[str, Any], alpha: float, out: str | Path, base_gguf: str | Path) -> Path:
    """Write `state` (peft's adapter state dict) as a llama.cpp LoRA adapter for `base_gguf` at `out`."""
    gguf = require("gguf", "rm")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ConfigError(f"expected LoRA alpha > 0, got {alpha}")
    facts = BaseFacts.read(base_gguf)
    if facts.arch not in ARCHS:
        raise ConfigError(f"expected a base architecture in {sorted(ARCHS)} (the ones whose tensor layout is "
                          f"checked against transformers), got '{facts.arch}'")
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[facts.arch]
    names = gguf.get_tensor_name_map(arch_enum, facts.n_blocks)
    tensors: list[tuple[str, np.ndarray]] = []
    for module, ab in sorted(_pairs(state).items()):
        target = names.get_name(module)
        if target is None:
            raise DataError(f"expected a module llama.cpp names for '{facts.arch}', got '{module}'")
        name = f"{target}.weight"
        a, b = ab["A"], ab["B"]  # [r, in], [out, r]
        want = facts.shapes.get(name)
        if want is None or tuple(want[:2]) != (a.shape[1], b.shape[0]):
            raise DataError(f"expected base tensor '{name}' of ne [{a.shape[1]}, {b.shape[0]}] in '{base_gguf}', "
                            f"got {want}; export against the GGUF the trunk was loaded from")
        if ARCHS[facts.arch] and target.endswith((".attn_q", ".attn_k")):
            heads = facts.n_head if target.endswith(".attn_q") else facts.n_head_kv
            b = np.ascontiguousarray(qk_rows(b, heads))
        tensors += [(f"{name}.lora_a", a), (f"{name}.lora_b", b)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), facts.arch)
        w.add_type("adapter")
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for name, arr in tensors:
            w.add_tensor(name, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write_path_atomic(out, write)
    return out


def export_lora_file(path: str | Path, alpha: float, out: str | Path, base_gguf: str | Path) -> Path:
    """`export_lora_state` of a safetensors file (a checkpoint's adapters, no trunk needed)."""
    safetensors = require("safetensors.torch", "rm")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"expected an adapter safetensors file, got nothing at '{p}'")
    return export_lora_state(safetensors.load_file(str(p)), alpha, out, base_gguf)


def base_gguf_of(trunk: Trunk) -> Path:
    """The GGUF file the trunk's base model was loaded from (`load_causal_lm` names it)."""
    name = Path(trunk.lm.name)
    if name.suffix != ".gguf" or not name.is_file():
        raise ConfigError(f"expected a trunk loaded from a GGUF file, got '{trunk.lm.name}'; pass base_gguf=PATH "
                          "(the GGUF llama.cpp samples with)")
    return name


def export_gguf_lora(trunk: Trunk, out: str | Path, base_gguf: str | Path | None = None) -> Path:
    """The trunk's current adapters as a llama.cpp LoRA adapter at `out` (for `base_gguf`, default
    the GGUF the trunk was loaded from); returns `out`."""
    base = Path(base_gguf) if base_gguf is not None else base_gguf_of(trunk)
    return export_lora_state(trunk.adapter_state(), trunk.settings.alpha, out, base)
