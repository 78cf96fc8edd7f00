"""`qprobe eval` and `qprobe train`: every figure from the same prompts, held-out checks, skylines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from qprobe.cli.main import cli, main  # noqa: E402
from qprobe.collection.collect import CollectConfig, collect  # noqa: E402
from qprobe.evaluation.evaluate import (  # noqa: E402
    RunData,
    mean_reward_values,
    method_result,
    paired_difference,
    pass_at_k_values,
)


def fake_run(out: Path, split: str, size: int, n: int = 6) -> Path:
    collect(CollectConfig(task="fake", split=split, out=out, n=n, backend="fake", features=("-1:last",),
                          task_options={"size": size}), progress=False)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    train = fake_run(root / "train", "train", 30)
    test = fake_run(root / "test", "test", 12)
    probe = root / "pg"
    res = CliRunner().invoke(cli, ["train", "--run", str(train), "--out", str(probe), "--feature", "-1:last"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return {"train": train, "test": test, "probe": probe}


def invoke(args: list[str]):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_eval_prompts_file_restricts_every_figure(runs: dict[str, Path], tmp_path: Path) -> None:
    """The paired gains use the listed prompts only, like the means (they used every prompt before)."""
    data = RunData.load(runs["test"])
    listed = data.prompts()[:5]
    (tmp_path / "ids.txt").write_text("\n".join(listed) + "\n")
    out = tmp_path / "eval.json"
    res = invoke(["eval", "--run", str(runs["test"]), "--probe", str(runs["probe"]), "-k", "3",
                  "--prompts", str(tmp_path / "ids.txt"), "--json", str(out)])
    assert res.exit_code == 0, res.output
    keep = np.isin(data.prompt_ids, listed)
    sub = RunData(data.run, data.rows[keep], data.prompt_ids[keep], data.rewards[keep])
    p1 = method_result("pass@1", mean_reward_values(sub))
    top = method_result("pass@3", pass_at_k_values(sub, 3))
    gain = paired_difference(top, p1)
    line = next(x for x in res.output.splitlines() if x.startswith("pass@3"))
    assert f"{gain[0]:+.4f} [{gain[1]:+.4f}, {gain[2]:+.4f}]" in line
    assert all(f"{5:7d}" in x for x in res.output.splitlines()[2:])  # every row: 5 prompts
    # summarize keeps only the prompts it was given, so a later paired difference cannot see others
    every = mean_reward_values(data)
    assert set(method_result("x", every, listed).per_prompt) == set(listed)


def test_eval_prompts_file_with_unknown_ids_is_an_error(runs: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ids.txt").write_text("test/0\nno-such-prompt\n")
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--run", str(runs["test"]), "--prompts", str(tmp_path / "ids.txt")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "1 not there" in err and "no-such-prompt" in err and len(err.strip().splitlines()) == 1


def test_eval_refuses_a_probe_trained_on_the_evaluated_prompts(runs: dict[str, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Compared by prompt-text hash: a second collection of the same prompts (another path) overlaps too."""
    again = fake_run(tmp_path / "again", "train", 10, n=3)  # prompts 0-9 of the probe's 30
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--run", str(again), "--probe", str(runs["probe"])])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "trained on 10 of the 10 evaluated prompts" in err and "--allow-overlap" in err
    res = CliRunner().invoke(cli, ["eval", "--run", str(again), "--probe", str(runs["probe"]), "--allow-overlap"])
    assert res.exit_code == 0 and "not held-out" in res.stderr
    config = json.loads((runs["probe"] / "config.json").read_text())
    assert config["source"]["train_prompts"]["n"] == 30 and len(config["source"]["train_prompts"]["hashes"]) == 30
    # held-out prompts of the test split are fine
    assert invoke(["eval", "--run", str(runs["test"]), "--probe", str(runs["probe"])]).exit_code == 0


def test_skyline_of_real_valued_rewards_is_the_oracle_best_of_k(tmp_path: Path) -> None:
    """Rewards 0.5 and 0.9: pass@k (reward >= 1 counts) said 0; the exact best of k is the mean max."""
    from qprobe.store import RunWriter

    with RunWriter.create_or_open(tmp_path / "r", {"task": {"name": "x"}}) as w:
        rewards = [0.5, 0.9, 0.2, 1.0, 0.0, 0.0]
        w.append({"prompt_id": ["a", "a", "a", "b", "b", "b"], "prompt_index": [0, 0, 0, 1, 1, 1],
                  "sample_index": [0, 1, 2, 0, 1, 2], "prompt": ["pa"] * 3 + ["pb"] * 3, "completion": ["c"] * 6,
                  "n_tokens": [1] * 6, "finish_reason": ["stop"] * 6, "reward": rewards, "details": ["{}"] * 6,
                  "seed": list(range(6))}, {})
    values = pass_at_k_values(RunData.load(tmp_path / "r"), 2)
    # prompt a, pairs {.5,.9} {.5,.2} {.9,.2}: maxima .9 .5 .9; prompt b: 2 of its 3 pairs hold the 1.0
    assert values["a"] == pytest.approx((0.9 + 0.5 + 0.9) / 3) and values["b"] == pytest.approx(2 / 3)


def test_binary_skyline_is_the_unbiased_pass_at_k(runs: dict[str, Path]) -> None:
    from qprobe.metrics import pass_at_k

    data = RunData.load(runs["test"])
    values = pass_at_k_values(data, 3)
    p = data.prompts()[0]
    r = data.rewards[data.prompt_ids == p]
    assert values[p] == pytest.approx(pass_at_k(len(r), int((r == 1).sum()), 3))


def test_train_default_keeps_every_prompt_and_cross_validates(runs: dict[str, Path], tmp_path: Path) -> None:
    res = invoke(["train", "--run", str(runs["train"]), "--out", str(tmp_path / "p"), "--feature", "-1:last"])
    assert res.exit_code == 0, res.output
    assert "30 train (all; validation by cross-validation)" in res.output and "5-fold CV (30 prompts)" in res.output
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["history"]["n_prompts"] == 30 and "cv expected_return" in config["source"]["validation"]
    assert config["history"]["q_max"] >= config["history"]["q_min"]
    help_text = invoke(["train", "--help"]).output
    assert "every prompt" in help_text and "--cv-folds" in help_text


def test_train_and_eval_say_how_many_unscored_rows_they_dropped(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qprobe.store import Run

    run = fake_run(tmp_path / "r", "train", 8, n=4)
    r = Run.open(run)
    shard = run / "rows" / f"{r.shards[0].name}.parquet"
    t = pq.read_table(shard)
    rewards = t.column("reward").to_pylist()
    rewards[0] = rewards[1] = None  # two rows came back unscored (a sandbox error)
    pq.write_table(t.set_column(t.schema.get_field_index("reward"), "reward", pa.array(rewards, pa.float64())), shard)
    res = CliRunner().invoke(cli, ["train", "--run", str(run), "--out", str(tmp_path / "p"), "--cv-folds", "1"])
    assert res.exit_code == 0 and "2 rows left out: unscored" in res.output
    res = CliRunner().invoke(cli, ["eval", "--run", str(run)])
    assert res.exit_code == 0 and "2 of 32 rows left out: unscored" in res.stderr


def test_a_greedy_run_missing_prompts_is_refused_not_compared_on_fewer(runs: dict[str, Path], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from qprobe.generation.base import SamplingConfig

    greedy = tmp_path / "greedy"
    collect(CollectConfig(task="fake", split="test", out=greedy, n=1, backend="fake", features=("-1:last",),
                          task_options={"size": 5}, sampling=SamplingConfig(temperature=0.0)), progress=False)
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--run", str(runs["test"]), "--greedy-run", str(greedy)])
    assert exc.value.code == 2 and "greedy for every prompt compared, got none for 7" in capsys.readouterr().err
    (tmp_path / "ids.txt").write_text("".join(f"test/{i}\n" for i in range(5)))
    res = invoke(["eval", "--run", str(runs["test"]), "--greedy-run", str(greedy), "--prompts", str(tmp_path / "ids.txt")])
    assert res.exit_code == 0 and "greedy" in res.output
