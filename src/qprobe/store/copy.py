"""A copy of a run that keeps only some of its features (`qprobe copy`).

Runs grow with every feature a collection stores (the reproduction keeps seven per sample); the copy
that is shared or committed often needs only the rows and the chosen feature. The copy is built
under a temp name beside OUT, every file fsynced, and swapped into place
(`qprobe.core.files.replace_dir`), so OUT is either absent, the old run, or the whole new copy. The source is only read.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from qprobe.core.files import replace_dir, write_json_atomic
from qprobe.errors import StoreError
from qprobe.store.run import Run, Shard, now


def copy_run(src: str | os.PathLike[str], out: str | os.PathLike[str], features: list[str] | tuple[str, ...] = (),
             replace: bool = False, prompts: list[str] | None = None) -> Run:
    """Copy run `src` to `out` with its rows and only the feature keys `features` (none: rows only),
    and (`prompts`) only the rows of those prompt ids, every one of which the run must hold.

    `out` must not exist, or (with `replace`) must be a run, which is swapped for the copy only
    once the copy is complete."""
    run = Run.open(src)
    keep = None if prompts is None else _prompt_rows(run, prompts)
    out = Path(out)
    keys = list(dict.fromkeys(features))
    unknown = [k for k in keys if k not in run.feature_keys]
    if unknown:
        raise StoreError(f"expected feature keys among {run.feature_keys}, got {unknown} for run {run.path}; "
                         "see `qprobe inspect RUN`")
    if out.resolve() == run.path.resolve():
        raise StoreError(f"expected OUT to differ from the source run, got '{out}' for both; choose another OUT")
    if out.exists() and not replace:
        raise StoreError(f"expected OUT to be a new path, got '{out}' which exists; pass --replace to swap an "
                         "older copy for the new one, or choose another OUT")
    if out.exists() and not (out / "manifest.json").is_file():
        raise StoreError(f"expected --replace to name an existing run, got '{out}' which holds other files; "
                         "choose another OUT")

    def build(tmp: Path) -> None:
        (tmp / "rows").mkdir()
        (tmp / "features").mkdir()
        for key in keys:
            (tmp / "features" / key).mkdir()
        shards = _copy_shards(run, tmp, keys) if keep is None else _subset_shards(run, tmp, keys, keep)
        manifest: dict[str, Any] = dict(run.manifest)
        manifest["shards"] = shards
        if keep is not None:
            manifest["n_prompts"] = len(set(prompts or ()))
            manifest["subset"] = {"of": str(run.path), "prompts": len(set(prompts or ())),
                                  "rows": sum(s["rows"] for s in shards)}
        manifest["features"] = {k: v for k, v in run.manifest.get("features", {}).items() if k in keys}
        dropped = [k for k in run.feature_keys if k not in keys]
        manifest["copied_from"] = {"run": str(run.path), "features_dropped": dropped, "at": now(),
                                   "restore": "qprobe embed RUN --feature LAYER:POOLING (or embed=NAME:POOLING)"}
        write_json_atomic(tmp / "manifest.json", manifest)

    replace_dir(out, build)
    return Run.open(out)


def _copy_shards(run: Run, tmp: Path, keys: list[str]) -> list[dict[str, int]]:
    for s in run.shards:
        shutil.copyfile(run.path / "rows" / f"{s.name}.parquet", tmp / "rows" / f"{s.name}.parquet")
        for key in keys:
            for suffix in (".npy", ".offsets.npy"):
                f = run.path / "features" / key / f"{s.name}{suffix}"
                if suffix == ".npy" or f.exists():
                    shutil.copyfile(f, tmp / "features" / key / f.name)
    return [{"id": s.id, "rows": s.rows} for s in run.shards]


def _prompt_rows(run: Run, prompts: list[str]) -> np.ndarray:
    """A boolean mask over the run's rows (storage order): the rows of the listed prompts."""
    ids = run.table(["prompt_id"]).column("prompt_id").to_pylist()
    have = set(ids)
    missing = [p for p in dict.fromkeys(prompts) if p not in have]
    if missing:
        raise StoreError(f"expected prompt ids the run holds, got {len(missing)} it does not (e.g. {missing[:3]}) "
                         f"for run {run.path}; list ids from `qprobe export RUN`")
    wanted = set(prompts)
    return np.array([p in wanted for p in ids], dtype=bool)


def _subset_shards(run: Run, tmp: Path, keys: list[str], keep: np.ndarray) -> list[dict[str, int]]:
    """The kept rows of each shard, shards with none dropped and the rest renumbered from 0."""
    import pyarrow.parquet as pq

    shards: list[dict[str, int]] = []
    start = 0
    for s in run.shards:
        mask = keep[start : start + s.rows]
        start += s.rows
        if not mask.any():
            continue
        new = Shard(len(shards), int(mask.sum()))
        table = pq.read_table(run.path / "rows" / f"{s.name}.parquet").filter(mask)
        pq.write_table(table, tmp / "rows" / f"{new.name}.parquet")
        for key in keys:
            folder = run.path / "features" / key
            arr = np.load(folder / f"{s.name}.npy", mmap_mode="r")
            if run.feature_spec(key).pooling == "tokens":
                offsets = np.load(folder / f"{s.name}.offsets.npy")
                parts = [np.asarray(arr[a:b]) for a, b, m in zip(offsets[:-1], offsets[1:], mask, strict=True) if m]
                lengths = [len(p) for p in parts]
                np.save(tmp / "features" / key / f"{new.name}.offsets.npy",
                        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
                np.save(tmp / "features" / key / f"{new.name}.npy", np.concatenate(parts))
            else:
                np.save(tmp / "features" / key / f"{new.name}.npy", np.asarray(arr[mask]))
        shards.append({"id": new.id, "rows": new.rows})
    return shards
