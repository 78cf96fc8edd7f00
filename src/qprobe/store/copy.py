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

from qprobe.core.files import replace_dir, write_json_atomic
from qprobe.errors import StoreError
from qprobe.store.run import Run, now


def copy_run(src: str | os.PathLike[str], out: str | os.PathLike[str], features: list[str] | tuple[str, ...] = (),
             replace: bool = False) -> Run:
    """Copy run `src` to `out` with its rows and only the feature keys `features` (none: rows only).

    `out` must not exist, or (with `replace`) must be a run, which is swapped for the copy only
    once the copy is complete."""
    run = Run.open(src)
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
        for s in run.shards:
            shutil.copyfile(run.path / "rows" / f"{s.name}.parquet", tmp / "rows" / f"{s.name}.parquet")
        (tmp / "features").mkdir()
        for key in keys:
            folder = tmp / "features" / key
            folder.mkdir()
            for s in run.shards:
                for suffix in (".npy", ".offsets.npy"):
                    f = run.path / "features" / key / f"{s.name}{suffix}"
                    if suffix == ".npy" or f.exists():
                        shutil.copyfile(f, folder / f.name)
        manifest: dict[str, Any] = dict(run.manifest)
        manifest["features"] = {k: v for k, v in run.manifest.get("features", {}).items() if k in keys}
        dropped = [k for k in run.feature_keys if k not in keys]
        manifest["copied_from"] = {"run": str(run.path), "features_dropped": dropped, "at": now(),
                                   "restore": "qprobe embed RUN --feature LAYER:POOLING (or embed=NAME:POOLING)"}
        write_json_atomic(tmp / "manifest.json", manifest)

    replace_dir(out, build)
    return Run.open(out)
