"""Atomic, durable writes, the only ones in qprobe: a file (temp name, fsync, rename, fsync the
directory) and a directory (built complete under a temp name, then swapped for the old one).

Readers see the old version or the new one, never half of one; a crash leaves at most a `.tmp-*`
entry beside the target, which the next write ignores.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file written by someone else (e.g. `shutil.copyfile`) to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Write `path` through `write(f)` on a temp file in the same directory, then rename it into place.

    If `write` raises, the temp file is removed and `path` is left as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_path_atomic(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """`write_atomic` for writers that open the file themselves: `write(tmp)` fills a temp path in the
    same directory, which is then fsynced and renamed into place (removed if `write` raises)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    def write(f: BinaryIO) -> None:
        f.write(data)

    write_atomic(path, write)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def replace_dir(path: str | os.PathLike[str], build: Callable[[Path], None], *, keep_existing: bool = False) -> None:
    """Build a directory with `build(tmp)` beside `path`, fsync what it wrote, and swap it in.

    `path` is absent or the old directory until the new one is complete; then the new one takes its
    name and the old one is removed. If `build` raises, the temp directory goes and `path` stays.
    `keep_existing`: a `path` that exists once the build is done (another process finished first)
    is kept and the new build dropped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    old: Path | None = None
    try:
        build(tmp)
        for folder, _, names in os.walk(tmp, topdown=False):
            for name in names:
                fsync_file(Path(folder) / name)
            fsync_dir(folder)
        if path.exists() and keep_existing:
            return
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{path.name}-", dir=path.parent))
            os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None and not path.exists():
                os.replace(old / path.name, path)  # put the old one back
            raise
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
