from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from qprobe.cli.main import COMMANDS, cli, main


def run(args: list[str]) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, args, catch_exceptions=True)
    return r.exit_code, r.stdout, r.stderr


def test_every_command_has_useful_help() -> None:
    code, out, _ = run(["--help"])
    assert code == 0
    for name in COMMANDS:
        assert name in out
        code, text, _ = run([name, "--help"])
        assert code == 0, name
        assert len(text.split()) > 15, f"`qprobe {name} --help` is too thin"


def test_every_option_has_help() -> None:
    """Derived from the commands themselves: no option of any command (pairs' subcommands too) is
    listed in --help without a word of what it does."""
    import importlib

    import click

    def walk(name: str, cmd: click.Command):
        if isinstance(cmd, click.Group):
            for sub, c in cmd.commands.items():
                yield from walk(f"{name} {sub}", c)
        else:
            yield name, cmd

    bare = []
    for name, target in COMMANDS.items():
        module, _, attr = target.partition(":")
        for full, cmd in walk(name, getattr(importlib.import_module(module), attr)):
            bare += [f"qprobe {full} {p.opts[0]}" for p in cmd.params
                     if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip()]
    assert bare == []


def test_ls_lists_components_one_line_each() -> None:
    """Every entry of every registry, under its family's heading (the README names them all)."""
    import qprobe.catalog as catalog
    from qprobe.registry import Registry

    code, out, _ = run(["ls"])
    assert code == 0
    registries = [v for v in vars(catalog).values() if isinstance(v, Registry)]
    assert len(registries) >= 6
    sections: dict[str, list[str]] = {}
    head = ""
    for block in out.splitlines():
        if not block.startswith(" ") and block.endswith(":"):
            head = block
            sections[head] = []
        elif block.startswith("  "):
            sections[head].append(block.split()[0])
    for reg in registries:
        matching = [h for h, names in sections.items() if names == reg.names()]
        assert matching, f"`qprobe ls` lists no section with the {reg.kind}s {reg.names()}"
    assert "minilm" in sections[next(h for h in sections if h.startswith("external embedders"))]
    from qprobe.probes.pretrained import PRETRAINED

    assert sections[next(h for h in sections if h.startswith("shipped probes"))] == list(PRETRAINED)
    assert "sandbox isolation:" in out


def test_collect_inspect_export_on_fake(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["collect", "--task", "fake", "--backend", "fake", "--n", "3", "--limit", "4", "--out", str(out),
            "--task-option", "size=10", "--no-progress"]
    code, text, _ = run(args)
    assert code == 0, text
    code, text, _ = run(["inspect", str(out), "--json"])
    info = json.loads(text)
    assert info["samples"] == 12 and info["prompts"] == 4 and info["task"] == "fake / train"
    assert "L-1_last" in info["features"] and "[12, 16]" in info["features"]["L-1_last"]
    code, _, _ = run(["export", str(out), "--out", str(tmp_path / "rows.jsonl")])
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [(r["prompt_id"], r["sample_index"]) for r in rows] == [(f"train/{i}", j) for i in range(4) for j in range(3)]
    assert "features" not in rows[0] and isinstance(rows[0]["details"], dict)
    code, _, err = run(["copy", str(out), str(tmp_path / "slim"), "--feature", "L-1_last"])
    assert code == 0 and "wrote 12 rows" in err
    code, text, _ = run(["inspect", str(tmp_path / "slim"), "--json"])
    assert json.loads(text)["samples"] == 12


@pytest.mark.parametrize(
    "args, expect",
    [
        (["collect", "--task", "fak", "--backend", "fake", "--out", "{tmp}/r"], "did you mean 'fake'"),
        (["collect", "--task", "fake", "--backend", "fake", "--split", "dev", "--out", "{tmp}/r"], "splits"),
        (["collect", "--task", "fake", "--backend", "fake", "--n", "0", "--out", "{tmp}/r"], "--n >= 1"),
        (["collect", "--task", "fake", "--backend", "fake", "--feature", "x:y", "--out", "{tmp}/r"], "layer:pooling"),
        (["collect", "--task", "fake", "--backend", "fake", "--task-option", "size", "--out", "{tmp}/r"], "KEY=VALUE"),
        (["collect", "--task", "fake", "--backend", "fake", "--resume", "--out", "{tmp}/r"], "--resume"),
        (["inspect", "{tmp}"], "manifest.json"),
        (["copy", "{tmp}", "{tmp}/r"], "manifest.json"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_on_disk(tmp_path: Path, qprobe_cmd: list[str], args: list[str], expect: str) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    p = subprocess.run([*qprobe_cmd, *argv], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert expect in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert not (tmp_path / "r").exists()


def test_main_returns_exit_code_2_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["inspect", str(tmp_path)])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("qprobe: error: expected a run directory")


def test_every_option_the_readme_shows_exists() -> None:
    """README and --help agree: each `qprobe CMD ... --option` the README writes is an option of CMD."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    spans = re.findall(r"`(qprobe [^`]+)`", readme)
    spans += [line.strip() for line in readme.splitlines() if line.strip().startswith("qprobe ")]
    checked = 0
    for span in spans:
        words = span.split()
        if len(words) < 2 or words[1] not in COMMANDS:
            continue
        sub = [words[2]] if words[1] in ("pairs", "rm") and len(words) > 2 and not words[2].startswith("-") else []
        code, text, _ = run([words[1], *sub, "--help"])
        assert code == 0, span
        for opt in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", span):
            assert opt in text, f"README: `{span}` uses {opt}, which `qprobe {words[1]} --help` does not list"
            checked += 1
    assert checked > 20
