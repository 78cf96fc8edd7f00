"""The one atomic file writer and the one directory swap (qprobe.core.files)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import qprobe
from qprobe.core.files import replace_dir, write_atomic, write_json_atomic

SRC = Path(qprobe.__file__).parent


def test_write_atomic_replaces_and_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    f = tmp_path / "a.json"
    write_json_atomic(f, {"v": 1})
    assert json.loads(f.read_text()) == {"v": 1}

    def half(out) -> None:
        out.write(b'{"v": ')
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_atomic(f, half)
    assert json.loads(f.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temp file left


def test_replace_dir_swaps_a_complete_directory(tmp_path: Path) -> None:
    d = tmp_path / "probe"
    replace_dir(d, lambda t: (t / "x").write_text("old"))
    replace_dir(d, lambda t: (t / "y").write_text("new"))
    assert sorted(p.name for p in d.iterdir()) == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe"]


def test_replace_dir_failure_keeps_the_old_directory(tmp_path: Path) -> None:
    d = tmp_path / "run"
    replace_dir(d, lambda t: (t / "x").write_text("old"))

    def broken(t: Path) -> None:
        (t / "y").write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_dir(d, broken)
    assert [p.read_text() for p in d.iterdir()] == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_replace_dir_keep_existing_drops_the_new_build(tmp_path: Path) -> None:
    d = tmp_path / "cache"

    def build(t: Path) -> None:
        (t / "mine").write_text("1")
        d.mkdir()  # another process finished first
        (d / "theirs").write_text("2")

    replace_dir(d, build, keep_existing=True)
    assert sorted(p.name for p in d.iterdir()) == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_renames_and_fsyncs_live_only_in_core_files() -> None:
    """One writer, one swap: no other module renames files into place or fsyncs on its own."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path == SRC / "core" / "files.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and (node.value.id, node.attr) in {("os", "replace"), ("os", "rename"), ("os", "fsync"),
                                                       ("shutil", "move")}):
                found.append(f"{path.relative_to(SRC)}:{node.lineno} {node.value.id}.{node.attr}")
    assert found == []
