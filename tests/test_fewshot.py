"""Few-shot prompts from successes (tasks/fewshot.py, collection/fewshot.py) and `collect --shots-from`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from qprobe.cli.main import cli, main
from qprobe.collection.collect import CollectConfig, collect
from qprobe.collection.fewshot import shots_from_run
from qprobe.core.types import Prompt
from qprobe.errors import DataError
from qprobe.store import Run
from qprobe.tasks.fewshot import SEPARATOR, Shot, with_shots


def test_with_shots_chat_and_text_forms() -> None:
    shot = Shot(Prompt(id="a", text="Q1\n", messages=({"role": "user", "content": "Q1"},)), "A1", {})
    query = Prompt(id="q", text="Q2\n", reward_prefix="def f():\n",
                   messages=({"role": "system", "content": "S"}, {"role": "user", "content": "Q2"}))
    p = with_shots(query, [shot, shot])
    assert p.text == "Q1\nA1" + SEPARATOR + "Q1\nA1" + SEPARATOR + "Q2\n"
    assert p.messages == ({"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                          {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q1"},
                          {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"})
    assert p.reward_prefix == "def f():\n" and p.id == "q"  # the reward sees the query's own prefix only
    plain = with_shots(Prompt(id="q", text="Q2\n"), [shot])
    assert plain.messages is None and plain.text == "Q1\nA1" + SEPARATOR + "Q2\n"


@pytest.fixture()
def train_run(tmp_path):
    return collect(CollectConfig(task="fake", backend="fake", split="train", out=tmp_path / "train", n=4, limit=12,
                                 task_options={"size": 30}), progress=False)


def test_shots_are_successes_of_distinct_problems(train_run) -> None:
    shots = shots_from_run(str(train_run.path), k=3, seed=1)
    rows = {(r["prompt_id"], r["sample_index"]): r for r in train_run.table().to_pylist()}
    assert len({s.source["prompt_id"] for s in shots}) == 3
    for s in shots:
        row = rows[(s.source["prompt_id"], s.source["sample_index"])]
        assert row["reward"] == 1.0 and row["completion"] == s.completion
        assert s.prompt.id == s.source["prompt_id"]
    assert [s.source for s in shots] == [s.source for s in shots_from_run(str(train_run.path), k=3, seed=1)]
    with pytest.raises(DataError, match="problems with a success"):
        shots_from_run(str(train_run.path), k=13)


def test_collect_with_shots_records_them_and_resumes(train_run, tmp_path, capsys) -> None:
    out = tmp_path / "test"
    args = ["collect", "--task", "fake", "--split", "test", "--task-option", "size=3", "--backend", "fake",
            "--n", "2", "--out", str(out), "--shots-from", str(train_run.path), "--shots", "2", "--no-progress"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    run = Run.open(out)
    shots = run.manifest["task"]["shots"]
    assert len(shots) == 2 and run.manifest["task"]["task"] == "fake"
    first = shots_from_run(str(train_run.path), k=2)
    assert all(first[i].completion + SEPARATOR in p for p in run.table().column("prompt").to_pylist() for i in (0, 1))
    # the train run grows: a resume keeps the examples the run was started with
    collect(CollectConfig(task="fake", backend="fake", split="train", out=train_run.path, n=4, task_options={"size": 30}),
            progress=False)
    assert len(Run.open(train_run.path)) == 120
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "manifest.json").read_text())["task"]["shots"] == shots
    with pytest.raises(SystemExit) as exc:
        main([*args[:-3], "--shots", "3", "--no-progress"])
    assert exc.value.code == 2 and "solved examples" in capsys.readouterr().err


def test_a_prompt_never_sees_its_own_problem_among_its_examples(train_run, tmp_path) -> None:
    """--shots-from a run of the same split: a drawn example that is one of the collected prompts is
    replaced, for that prompt only, by a spare example of another problem."""
    out = tmp_path / "same"
    run = collect(CollectConfig(task="fake", split="train", out=out, n=1, limit=12, task_options={"size": 30},
                                shots_from=str(train_run.path), shots=3), progress=False)
    shots = run.manifest["task"]["shots"]
    assert len(shots) == 4 and shots[-1].get("spare") is True and not any(s.get("spare") for s in shots[:3])
    by_id = {s.source["prompt_id"]: s for s in shots_from_run(str(train_run.path), k=3, keep=shots)}
    rows = run.table(["prompt_id", "prompt"]).to_pylist()
    for row in rows:
        own = by_id.get(row["prompt_id"])
        if own is not None:  # its own solved example is not in its context ...
            assert own.completion + SEPARATOR not in row["prompt"]
        # ... and it has exactly 3 examples
        assert row["prompt"].count(SEPARATOR) == 3
    # a resume keeps the same examples, spare included
    again = collect(CollectConfig(task="fake", split="train", out=out, n=2, limit=12, task_options={"size": 30},
                                  shots_from=str(train_run.path), shots=3), progress=False)
    assert again.manifest["task"]["shots"] == shots and len(again) == 24
