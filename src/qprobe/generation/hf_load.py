"""Loading a causal LM with transformers: local folder, hub id or GGUF file, with a one-time GGUF cache.

`load_causal_lm(model, gguf_file=None, dtype="bfloat16", device=None)` returns a `LoadedLM`.
`model` may be:
  - "" or "default": the packaged default GGUF (`qprobe.generation.models.default_model_path()`);
  - a path to a `.gguf` file (or a folder plus `gguf_file=NAME`);
  - a local transformers folder or a hub id.

transformers dequantises a GGUF file on every `from_pretrained(dir, gguf_file=...)` (40-45 s for
the 0.5B default on 2 cores). The first load therefore saves the dequantised model as safetensors
into `$QPROBE_CACHE/hf/<sha256-of-gguf>-<dtype>/` (default cache `~/.cache/qprobe`), written to a
temporary folder and renamed (atomic); later loads read that folder.

The weights hash (`sha256`) is the GGUF file's sha256, so features from these weights are
interchangeable with the llama.cpp back-end's features of the same file (FeatureSpec).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qprobe.core.files import replace_dir
from qprobe.core.types import Completion
from qprobe.errors import BackendError, ConfigError, require
from qprobe.generation.models import file_sha256

DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class LoadedLM:
    """A loaded causal LM, its tokenizer, and what identifies the weights."""

    model: Any  # transformers PreTrainedModel (eval mode)
    tokenizer: Any
    name: str  # what the user asked for (path or hub id)
    sha256: str
    dtype: str
    device: str

    def identity(self) -> dict[str, Any]:
        return {"model": self.name, "sha256": self.sha256, "dtype": self.dtype, "device": self.device}


def kv_cache(model: Any, cache: Any) -> dict[str, Any]:
    """The key-value cache as `forward` takes it: `cache=` in transformers 5 (which warns on the old
    name), `past_key_values=` before."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def cache_root() -> Path:
    """`$QPROBE_CACHE` or `~/.cache/qprobe`."""
    return Path(os.environ.get("QPROBE_CACHE") or Path.home() / ".cache" / "qprobe")


def folder_sha256(folder: Path) -> str:
    """A hash over the weight files of a transformers folder (names and contents)."""
    h = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    for f in files:
        h.update(f.name.encode() + b"\x00" + file_sha256(f, write_sidecar=False).encode())
    return h.hexdigest()


def hf_source(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name or None) for what the user named."""
    if model in ("", "default"):
        try:
            from qprobe.generation.models import default_model_path
        except ImportError as exc:  # pragma: no cover - the llama.cpp helper provides it
            raise BackendError(f"expected the default model helper qprobe.generation.models ({exc})") from exc
        model = str(default_model_path())
    p = Path(model).expanduser()
    if gguf_file:
        return str(p), gguf_file
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ConfigError(f"expected a GGUF file at {p}, got nothing there; check the path")
        return str(p.parent), p.name
    return model, None


def _torch_dtype(dtype: str) -> Any:
    if dtype not in DTYPES:
        raise ConfigError(f"expected dtype in {list(DTYPES)}, got '{dtype}'")
    torch = require("torch", "transformers")
    return getattr(torch, dtype)


def default_device(device: str | None) -> str:
    if device:
        return device
    torch = require("torch", "transformers")
    return "cuda" if torch.cuda.is_available() else "cpu"


def _gguf_cache_dir(sha: str, dtype: str) -> Path:
    return cache_root() / "hf" / f"{sha}-{dtype}"


def _convert_gguf(folder: str, gguf_file: str, dtype: str, dest: Path) -> None:
    """Dequantise a GGUF file once and save it as a transformers folder (atomic rename)."""
    tf = require("transformers", "transformers")
    require("gguf", "transformers")
    torch_dtype = _torch_dtype(dtype)
    extra: dict[str, Any] = {}
    if hasattr(tf, "GgufConfig"):  # transformers >= 5 keeps GGUF blocks packed unless told otherwise
        extra["quantization_config"] = tf.GgufConfig(dequantize=True)
    model = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch_dtype, **extra)
    tok = tf.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "qprobe-source.json").write_text(json.dumps({"gguf": str(Path(folder) / gguf_file)}))

    replace_dir(dest, build, keep_existing=True)  # another process may have finished first


def load_causal_lm(
    model: str, gguf_file: str | None = None, dtype: str = "bfloat16", device: str | None = None
) -> LoadedLM:
    """Load a causal LM and its tokenizer for inference (see the module docstring)."""
    tf = require("transformers", "transformers")
    torch_dtype = _torch_dtype(dtype)
    device = default_device(device)
    source, gguf = hf_source(model, gguf_file)
    try:
        if gguf:
            sha = file_sha256(Path(source) / gguf, write_sidecar=False)
            folder = _gguf_cache_dir(sha, dtype)
            if not (folder / "config.json").exists():
                _convert_gguf(source, gguf, dtype, folder)
            load_from, name = str(folder), str(Path(source) / gguf)
        else:
            load_from, name = source, source
            local = Path(source).expanduser()
            sha = folder_sha256(local) if local.is_dir() else f"hub:{source}"
        from qprobe.core.verbosity import quiet_transformers

        quiet_transformers()
        lm = tf.AutoModelForCausalLM.from_pretrained(load_from, dtype=torch_dtype)
        tok = tf.AutoTokenizer.from_pretrained(load_from)
    except (OSError, ValueError) as exc:
        raise BackendError(
            f"expected a loadable causal LM (folder, hub id or .gguf file), got '{model}': {exc}"
        ) from exc
    if sha.startswith("hub:"):
        sha = f"hub:{source}@{getattr(lm.config, '_commit_hash', None) or 'unknown'}"
    lm.to(device).eval()
    return LoadedLM(model=lm, tokenizer=tok, name=name, sha256=sha, dtype=dtype, device=device)


def decoder_blocks(model: Any) -> Any:
    """The ModuleList of decoder blocks (Llama/Qwen/Mistral `model.layers`, GPT-2 `transformer.h`, ...)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for attr in ("layers", "h", "blocks", "block"):
        blocks = getattr(base, attr, None)
        if blocks is not None and hasattr(blocks, "__len__"):
            return blocks
    raise BackendError(
        f"expected a decoder with a list of blocks (layers / h / blocks), got {type(base).__name__}; "
        "this architecture is not supported for hidden-state features yet"
    )


def final_norm(model: Any) -> Any:
    """The final norm applied after the last block (None if the architecture has none)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for attr in ("norm", "ln_f", "final_layer_norm", "final_layernorm"):
        mod = getattr(base, attr, None)
        if mod is not None:
            return mod
    return None


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Prompt ids as generation sees them: BOS added unless the text starts with it."""
    bos = tokenizer.bos_token
    add = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add)["input_ids"])


def completion_ids(tokenizer: Any, c: Completion) -> list[int]:
    """The completion's generated ids when they decode to its text, else its text tokenised."""
    if c.token_ids is not None:
        ids = list(c.token_ids)
        special = set(tokenizer.all_special_ids)
        while ids and ids[-1] in special:
            ids.pop()
        if tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == c.text:
            return ids
    return list(tokenizer(c.text, add_special_tokens=False)["input_ids"])
