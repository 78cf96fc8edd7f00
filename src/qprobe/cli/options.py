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
