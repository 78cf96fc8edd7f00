"""Reading task data: a local JSON Lines file (or folder) or a Hugging Face dataset name."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from qprobe.errors import DataError, require


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl (or .jsonl.gz) file; a clear error on a missing file or a bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"expected a JSON Lines file, got '{path}' which does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"expected one JSON object per line in '{path}', got bad JSON on line {i}: {exc}") from exc
    return rows


def is_local(data: str) -> bool:
    return Path(data).exists() or data.endswith((".jsonl", ".json", ".gz")) or data.startswith((".", "/", "~"))


def load_hf(name: str, config: str | None = None) -> list[dict[str, Any]]:
    """All splits of a Hugging Face dataset, concatenated (needs the 'datasets' extra)."""
    datasets = require("datasets", "datasets")
    try:
        ds = datasets.load_dataset(name, config) if config else datasets.load_dataset(name)
    except Exception as exc:  # noqa: BLE001  network, name or cache errors all mean the same here
        raise DataError(f"expected a loadable Hugging Face dataset, got '{name}' ({exc}); pass a local file with data=PATH") from exc
    return [dict(row) for split in ds.values() for row in split]
