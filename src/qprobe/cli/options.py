"""Shared CLI option parsing."""

from __future__ import annotations

import json
from typing import Any

from qprobe.errors import ConfigError


def parse_kv(pairs: tuple[str, ...], flag: str) -> dict[str, Any]:
    """('size=20', 'data=x.jsonl') -> {'size': 20, 'data': 'x.jsonl'}; values parsed as JSON when they can be."""
    out: dict[str, Any] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected {flag} KEY=VALUE, got '{item}'; e.g. {flag} size=20")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def read_ids(path: Any, flag: str = "--prompts") -> list[str]:
    """The prompt ids listed in a file, one a line (blank lines skipped), in file order."""
    from pathlib import Path

    from qprobe.errors import DataError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"expected a file of prompt ids (one a line) for {flag}, got '{p}' which does not exist")
    ids = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"expected at least one prompt id in {flag} file '{p}', got an empty file")
    return ids


def generator_name(probe: Any, probe_path: str, backend: str | None) -> str:
    """The back-end to generate with: `backend`, else the one of the probe's features; for a probe on an
    external embedder's features (any generator will do) the generator of its training run."""
    import json
    from pathlib import Path

    from qprobe.errors import ConfigError

    spec = probe.feature_spec_
    if not spec.embedder:
        return str(backend or spec.backend)
    name = backend or (probe.source_.get("generator") or {}).get("backend")
    manifest = Path(str(probe.source_.get("run", ""))) / "manifest.json"
    if not name and probe.source_.get("run") and manifest.is_file():
        name = json.loads(manifest.read_text()).get("backend", {}).get("name")
    if not name:
        raise ConfigError(f"expected --backend NAME for probe {probe_path}, whose features come from the external "
                          f"embedder '{spec.embedder}' and whose training run names no generator; e.g. --backend llamacpp")
    return str(name)


def trunk_options(seed_help: str) -> Any:
    """The click options of a LoRA trunk (`qprobe.rm.trunk`), shared by `rm train`, `rl` and `iterate`:
    --model, --top-blocks, --lora-r, --lora-alpha, --seed, --dtype, --threads (the names of
    RMConfig / RLConfig / IterConfig's fields)."""
    import click

    options = [
        click.option("--model", default="", help="Base model for the trunk: a .gguf, a transformers folder or hub id (default: the packaged GGUF)."),
        click.option("--top-blocks", type=int, default=4, show_default=True, help="LoRA on the top N blocks only (the rest frozen)."),
        click.option("--lora-r", type=int, default=16, show_default=True, help="LoRA rank."),
        click.option("--lora-alpha", type=float, default=32.0, show_default=True, help="LoRA alpha (scale alpha / r)."),
        click.option("--seed", type=int, default=0, show_default=True, help=seed_help),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True, help="Model precision."),
        click.option("--threads", type=int, default=None, help="torch CPU threads."),
    ]

    def decorate(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def set_torch_threads(n: int | None) -> None:
    """--threads: torch's CPU threads (None: torch's default)."""
    if n is not None:
        import torch

        torch.set_num_threads(n)
