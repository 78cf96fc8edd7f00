"""`qprobe train` on a fake run: numbers printed, probe saved and loadable, errors are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from qprobe.cli.main import cli, main  # noqa: E402
from qprobe.collection.collect import CollectConfig, collect  # noqa: E402
from qprobe.probes import Probe  # noqa: E402
from qprobe.store import Run  # noqa: E402


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "fake"
    collect(CollectConfig(task="fake", split="train", out=out, n=8, backend="fake",
                          features=("-1:last", "-2:mean"), task_options={"size": 40}), progress=False)
    return out


def invoke(args: list[str]):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_train_pg_prints_validation_and_saves(fake_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "probe"
    res = invoke(["train", "--run", str(fake_run), "--loss", "pg", "--out", str(out), "--feature", "-1:last",
                  "--holdout", "0.25", "--k", "4", "--select-folds", "3"])
    assert res.exit_code == 0, res.output
    assert "held out (10 prompts)" in res.output and "expected return@4" in res.output and "pass@4" in res.output
    probe = Probe.from_pretrained(out, spec=Run.open(fake_run).feature_spec("L-1_last"))
    config = json.loads((out / "config.json").read_text())
    assert config["source"]["feature"] == "L-1_last" and config["source"]["run"] == str(fake_run.resolve())
    assert "held_out expected_return" in config["source"]["validation"]
    assert config["train"]["select_folds"] == 3
    assert probe.n_features_in_ == 16


def test_train_picks_a_feature_and_is_deterministic(fake_run: Path, tmp_path: Path) -> None:
    args = ["train", "--run", str(fake_run), "--loss", "listwise", "--seed", "3"]
    a = invoke(args + ["--out", str(tmp_path / "a")])
    b = invoke(args + ["--out", str(tmp_path / "b")])
    assert a.exit_code == b.exit_code == 0 and "<- chosen" in a.output
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_train_paper_recipe_mlp_and_pairwise(fake_run: Path, tmp_path: Path) -> None:
    res = invoke(["train", "--run", str(fake_run), "--loss", "bt", "--recipe", "paper", "--arch", "mlp",
                  "--depth", "1", "--width", "8", "--feature", "L-1_last", "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["recipe"] == "paper" and config["architecture"] == "mlp" and config["standardize"] is False


def test_errors_are_one_line(fake_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args, expected in [
        (["--loss", "pgg"], "did you mean 'pg'"),
        (["--loss", "pg", "--loss-option", "tau=1"], "options of loss 'pg'"),
        (["--feature", "5:last"], "expected a feature among"),
        (["--model", "mlp"], "expected --arch linear|mlp"),  # --model means weights elsewhere
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["train", "--run", str(fake_run), "--out", str(tmp_path / "x"), *args])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1


def test_select_answers_with_the_trained_probe(fake_run: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`qprobe select` end to end on the fake back-end: k candidates scored, the argmax chosen, with
    and without the consensus term; a bad combination is one line and exit 2."""
    from qprobe.policy.agreement import agreement, jaccard_matrix

    probe = tmp_path / "probe"
    assert invoke(["train", "--run", str(fake_run), "--loss", "pg", "--out", str(probe), "--feature", "-1:last"]).exit_code == 0
    picks = {}
    for w in ("0", "3"):
        res = invoke(["select", "--probe", str(probe), "--prompt", "def f(x):", "-k", "5", "--json", "--consensus", w])
        assert res.exit_code == 0, res.output
        sel = json.loads(res.output.strip().splitlines()[0])
        scores = [c["score"] for c in sel["candidates"]]
        assert len(scores) == 5 and sel["index"] == scores.index(max(scores))
        picks[w] = sel
    texts = [c["text"] for c in picks["0"]["candidates"]]
    want = [c["score"] for c in picks["0"]["candidates"]] + 3 * agreement(jaccard_matrix(texts))
    assert [c["score"] for c in picks["3"]["candidates"]] == pytest.approx(list(want))
    with pytest.raises(SystemExit) as exc:
        main(["select", "--probe", str(probe), "--prompt", "x", "--rejection", "--beta", "0.5", "--consensus", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "consensus" in err and len(err.strip().splitlines()) == 1


def test_eval_with_consensus_rows(fake_run: Path, tmp_path: Path) -> None:
    """`qprobe eval`: pass@1, each probe, probe + consensus, consensus alone and pass@k, each the
    exact per-prompt value averaged over prompts (checked against the library functions)."""
    import numpy as np

    from qprobe.evaluation.consensus_return import consensus_values
    from qprobe.evaluation.evaluate import RunData, probe_scores, probe_values

    test_run = tmp_path / "test"
    collect(CollectConfig(task="fake", split="test", out=test_run, n=6, backend="fake", features=("-1:last",),
                          task_options={"size": 12}), progress=False)
    probe = tmp_path / "pg"
    assert invoke(["train", "--run", str(fake_run), "--loss", "pg", "--out", str(probe), "--feature", "-1:last"]).exit_code == 0
    out = tmp_path / "eval.json"
    res = invoke(["eval", "--run", str(test_run), "--probe", str(probe), "-k", "3", "--beta", "0.1",
                  "--consensus", "2", "--json", str(out)])
    assert res.exit_code == 0, res.output
    methods = json.loads(out.read_text())["methods"]
    assert list(methods) == ["pass@1", "pg (k=3)", "pg + 2 x consensus (k=3)", "consensus alone (k=3)", "pass@3"]
    data = RunData.load(test_run)
    scores = probe_scores(data, Probe.from_pretrained(probe))
    assert methods["pg (k=3)"][0] == pytest.approx(np.mean(list(probe_values(data, scores, 3, 0.1).values())))
    both = consensus_values(data.prompt_ids, data.completions(), scores, data.rewards, 3, 0.1, 2.0)
    assert methods["pg + 2 x consensus (k=3)"][0] == pytest.approx(np.mean(list(both.values())))
    assert methods["pass@1"][0] == pytest.approx(float(np.mean(data.rewards)))
    assert "consensus alone (k=3)" in res.output
