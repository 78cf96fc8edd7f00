"""`CollectConfig` is the one source of `qprobe collect`'s options, its config files and the manifest."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import click
import pytest
from click.testing import CliRunner

from qprobe.cli.config_options import config_from_cli, config_options, field_options
from qprobe.cli.main import cli, main
from qprobe.cli.run_cmds import collect_cmd
from qprobe.collection.collect import CollectConfig
from qprobe.core.config import config_from_dict, config_to_dict
from qprobe.errors import ConfigError
from qprobe.generation.base import SamplingConfig
from qprobe.store import Run

# The flags the README and the tests use: every one must keep working.
OLD_FLAGS = {"--task", "--split", "--n", "--backend", "--model", "--feature", "--layer", "--pooling", "--limit",
             "--out", "--resume", "--temperature", "--top-p", "--max-new-tokens", "--stop", "--seed",
             "--task-option", "--backend-option", "--shots-from", "--shots", "--shots-seed", "--feature-dtype",
             "--shard-samples", "--allow-code-execution", "--progress"}


def flags(command: click.Command) -> set[str]:
    return {opt for p in command.params for opt in p.opts}


def dump(args: list[str]) -> dict:
    r = CliRunner().invoke(cli, ["collect", *args, "--dump-config"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_every_field_is_an_option_and_every_old_flag_works() -> None:
    names = {o.path[-1] for o in field_options(CollectConfig)}
    nested = {f.name for f in fields(SamplingConfig)}
    assert names == ({f.name for f in fields(CollectConfig)} - {"sampling"}) | nested
    assert OLD_FLAGS <= flags(collect_cmd)


def test_defaults_come_from_the_dataclass() -> None:
    cfg = CollectConfig(task="fake", out=Path("r"))
    assert dump(["--task", "fake", "--out", "r"]) == config_to_dict(cfg)


def test_cli_config_equals_the_python_config(tmp_path: Path) -> None:
    got = dump(["--task", "fake", "--backend", "fake", "--split", "test", "--n", "3", "--limit", "4",
                "--out", str(tmp_path / "r"), "--task-option", "size=10", "--task-option", "name=x",
                "--feature", "-1:last", "--layer", "2", "--pooling", "mean", "--stop", "A", "--stop", "B",
                "--temperature", "0", "--top-p", "0.5", "--max-new-tokens", "7", "--seed", "9",
                "--prompt-id", "test/1", "--feature-dtype", "float16", "--shard-seconds", "2.5"])
    want = CollectConfig(task="fake", backend="fake", split="test", n=3, limit=4, out=tmp_path / "r",
                         task_options={"size": 10, "name": "x"}, features=("-1:last", "2:mean"),
                         sampling=SamplingConfig(temperature=0.0, top_p=0.5, max_new_tokens=7, stop=("A", "B"), seed=9),
                         prompt_ids=("test/1",), feature_dtype="float16", shard_seconds=2.5)
    assert CollectConfig.from_dict(got) == want


def test_config_file_round_trips_and_options_override_it(tmp_path: Path) -> None:
    first = dump(["--task", "fake", "--out", str(tmp_path / "r"), "--n", "2", "--task-option", "size=3",
                  "--stop", "X"])
    path = tmp_path / "c.json"
    path.write_text(json.dumps(first))
    assert dump(["--config", str(path)]) == first
    over = dump(["--config", str(path), "--n", "5", "--task-option", "extra=1", "--temperature", "0"])
    assert over["n"] == 5 and over["task_options"] == {"size": 3, "extra": 1}
    assert over["sampling"] == {**first["sampling"], "temperature": 0.0}
    assert {k: v for k, v in over.items() if k not in ("n", "task_options", "sampling")} == \
        {k: v for k, v in first.items() if k not in ("n", "task_options", "sampling")}


def test_the_manifest_keeps_the_config_and_resumes_from_it(tmp_path: Path) -> None:
    out = tmp_path / "r"
    args = ["collect", "--task", "fake", "--backend", "fake", "--n", "2", "--limit", "3", "--task-option", "size=5",
            "--out", str(out), "--no-progress"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"] == dump(args[1:-1])
    assert CollectConfig.from_dict(manifest["config"]).n == 2
    r = CliRunner().invoke(cli, ["collect", "--config", str(out / "manifest.json"), "--limit", "4", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert len(Run.open(out)) == 8


def test_python_round_trip() -> None:
    cfg = CollectConfig(task="mbpp", out=Path("runs/x"), features=("-1:last", "embed=minilm:mean"),
                        sampling=SamplingConfig(stop=("\n\n",)), prompt_ids=("a", "b"), backend_options={"n_ctx": 4096})
    assert CollectConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert config_from_dict(SamplingConfig, cfg.sampling.to_dict()) == cfg.sampling


@pytest.mark.parametrize("data, expect", [
    ({"task": "fake", "out": "r", "nn": 3}, "did you mean 'n'"),
    ({"task": "fake", "out": "r", "n": "3"}, "CollectConfig.n to be int"),
    ({"task": "fake", "out": "r", "features": "-1:last"}, "CollectConfig.features to be a list"),
    ({"task": "fake", "out": "r", "sampling": {"temp": 1}}, "keys of CollectConfig.sampling"),
    ({"out": "r"}, "CollectConfig.task"),
])
def test_bad_config_files_are_refused(data: dict, expect: str) -> None:
    with pytest.raises(ConfigError, match=expect):
        CollectConfig.from_dict(data)


def test_bad_config_file_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.json").write_text('{"task": "fake", "out": "r", "shards": 4}')
    for argv in (["collect", "--config", str(tmp_path / "c.json")], ["collect", "--n", "2"],
                 ["collect", "--config", str(tmp_path / "missing.json")]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("qprobe: error: expected") and len(err.strip().splitlines()) == 1


@dataclass(frozen=True)
class _Inner:
    mode: Literal["a", "b"] = "a"
    fast: bool = False


@dataclass(frozen=True)
class _Outer:
    path: Path = field(metadata={"help": "where"})
    inner: _Inner = field(default_factory=_Inner)
    tags: tuple[str, ...] = ()


def test_any_config_dataclass_becomes_options() -> None:
    @click.command()
    @config_options(_Outer)
    @click.pass_context
    def cmd(ctx: click.Context, config_file: Path | None, dump_config: bool) -> None:
        click.echo(json.dumps(config_to_dict(config_from_cli(_Outer, ctx))))

    r = CliRunner().invoke(cmd, ["--path", "x", "--mode", "b", "--fast", "--tags", "t1", "--tags", "t2"])
    assert r.exit_code == 0, r.output
    assert config_from_dict(_Outer, json.loads(r.stdout)) == _Outer(Path("x"), _Inner("b", True), ("t1", "t2"))
    assert CliRunner().invoke(cmd, ["--path", "x", "--mode", "c"]).exit_code == 2
    with pytest.raises(ConfigError, match="among"):
        config_from_dict(_Outer, {"path": "x", "inner": {"mode": "c"}})
