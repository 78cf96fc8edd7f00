"""Token-level probes (Q-RM): one linear head scores pooled states and every token; pairs from a run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

import torch  # noqa: E402

from qprobe.cli.main import cli, main  # noqa: E402
from qprobe.collection.collect import CollectConfig, collect  # noqa: E402
from qprobe.errors import ConfigError, DataError, SpecMismatchError  # noqa: E402
from qprobe.features.spec import FeatureSpec  # noqa: E402
from qprobe.probes import LinearProbe, Probe, TokenProbe  # noqa: E402
from qprobe.probes.losses import margin_bt_loss  # noqa: E402
from qprobe.probes.train import resolve_loss  # noqa: E402
from qprobe.store import Run, RunWriter  # noqa: E402
from qprobe.store.pairs import ordered_pairs, pairs_from_run  # noqa: E402
from qprobe.store.run import ROW_COLUMNS, prompt_hash  # noqa: E402

SPEC = {"backend": "fake", "model": "m", "sha256": "abc", "layer": 18, "dim": 3}


def spec(pooling: str) -> FeatureSpec:
    return FeatureSpec(pooling=pooling, **SPEC)  # type: ignore[arg-type]


def literal_head(weight, bias, mean=None, scale=None, aggregation: str = "mean") -> TokenProbe:
    """A TokenProbe with given weights (what the trainer and the loader set)."""
    probe = TokenProbe(aggregation=aggregation)
    probe._set_learned({"layers.0.weight": np.array([weight]), "layers.0.bias": np.array([bias])},
                       None if mean is None else np.array(mean), None if scale is None else np.array(scale), {})
    probe.feature_spec_, probe.source_ = None, {}
    return probe


def literal_pairs() -> tuple[np.ndarray, np.ndarray]:
    chosen = np.array([[1.0, 0.5, 2.0], [0.0, 1.0, 1.5], [2.0, -1.0, 0.5], [1.5, 0.0, 1.0]])
    rejected = np.array([[0.0, 1.0, -1.0], [1.0, 0.5, 0.0], [0.5, 0.0, -0.5], [0.0, 0.5, 0.5]])
    return chosen, rejected


# ------------------------------------------------------------------------------- the head
def test_pooled_score_equals_the_mean_of_token_scores_exactly() -> None:
    # Z_t = sum_j (h_tj - m_j) / s_j * w_j + b, by hand: token 1 -> 0 - 1 + 2 + 0.25, token 2 -> 0.5 + 1 + 0 + 0.25
    probe = literal_head([0.5, -1.0, 2.0], 0.25, mean=[1.0, 0.0, -1.0], scale=[2.0, 0.5, 4.0])
    states = np.array([[1.0, 0.5, 3.0], [3.0, -0.5, -1.0]])  # [t=2, d=3]
    assert probe.score_tokens(states).tolist() == [1.25, 1.75]
    assert probe.score(states.mean(axis=0, keepdims=True)).tolist() == [1.5]  # pooled [2, 0, 1]
    assert probe.sequence_scores([states]).tolist() == [1.5]
    v, b = probe.token_head()  # the standardisation folded into the head
    assert v.tolist() == [0.25, -2.0, 0.5] and b == 0.25 - (0.25 - 0.0 - 0.5)


def test_a_trained_probe_keeps_the_identity_through_save_and_load(tmp_path: Path) -> None:
    probe = TokenProbe(seed=3).fit(pairs=literal_pairs(), spec=spec("mean"), source={"run": "literal"})
    rng = np.random.default_rng(0)
    states = [rng.standard_normal((t, 3)) for t in (1, 4, 7)]  # ragged candidates
    pooled = np.stack([s.mean(axis=0) for s in states])  # [3, d]
    for p in (probe, _round_trip(probe, tmp_path / "p")):
        tokens = np.array([p.score_tokens(s).mean() for s in states])
        np.testing.assert_allclose(p.score(pooled), tokens, rtol=0, atol=1e-12)
        np.testing.assert_allclose(p.sequence_scores(states), tokens, rtol=0, atol=0)
    loaded = Probe.from_pretrained(tmp_path / "p", spec=spec("mean"))
    assert type(loaded) is TokenProbe and loaded.aggregation == "mean"
    assert np.array_equal(loaded.score(pooled), probe.score(pooled))
    assert np.array_equal(loaded.score_tokens(states[2]), probe.score_tokens(states[2]))
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["architecture"] == "token" and config["hyper_parameters"] == {"aggregation": "mean"}
    assert config["loss"] == "margin_bt" and config["loss_options"] == {"beta": 0.2, "gamma": 2.0}
    assert config["source"]["run"] == "literal" and "score_tokens" in (tmp_path / "p" / "README.md").read_text()


def _round_trip(probe: Probe, path: Path) -> Probe:
    probe.save_pretrained(path)
    return Probe.from_pretrained(path)


def test_margin_bt_with_qrm_constants_against_a_hand_computation() -> None:
    # -log sigmoid(0.2 (Q_w - Q_l) - 2.0) = log(1 + exp(2.0 - 0.2 (Q_w - Q_l))): margins 2 and -3
    hand = (math.log(1 + math.exp(2.0 - 0.2 * 2.0)) + math.log(1 + math.exp(2.0 + 0.2 * 3.0))) / 2
    assert hand == pytest.approx((1.7839007 + 2.6716447) / 2, abs=1e-6)  # log(1 + e^1.6), log(1 + e^2.6)
    chosen, rejected = torch.tensor([3.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 4.0], dtype=torch.float64)
    probe = TokenProbe()
    fn, kind = resolve_loss(probe.loss, probe.loss_options)
    assert (probe.loss, probe.loss_options, kind) == ("margin_bt", {"beta": 0.2, "gamma": 2.0}, "pairwise")
    assert fn(chosen, rejected, **probe.loss_options).item() == pytest.approx(hand, abs=1e-12)
    assert margin_bt_loss(chosen, rejected).item() == pytest.approx(hand, abs=1e-12)
    assert TokenProbe(loss_options={"gamma": 0.0}).loss_options == {"beta": 0.2, "gamma": 0.0}
    assert TokenProbe(loss="pg").loss_options == {}


def test_mean_min_and_last_aggregations_on_literal_arrays() -> None:
    probe = literal_head([1.0, -1.0, 0.0], 0.0)  # Z_t = h_t0 - h_t1
    cands = [np.array([[1.0, 0.0, 5.0], [0.0, 0.0, 1.0], [3.0, 1.0, 0.0]]),  # Z = 1, 0, 2
             np.array([[2.0, 0.0, 0.0], [2.0, 1.0, 9.0]]),  # Z = 2, 1
             np.array([[-1.0, 0.0, 0.0]])]  # Z = -1
    assert probe.sequence_scores(cands).tolist() == [1.0, 1.5, -1.0]
    assert probe.sequence_scores(cands, "min").tolist() == [0.0, 1.0, -1.0]
    assert probe.sequence_scores(cands, "last").tolist() == [2.0, 1.0, -1.0]
    pooled = np.stack([c.mean(axis=0) for c in cands])
    assert probe.sequence_scores(pooled).tolist() == [1.0, 1.5, -1.0]
    with pytest.raises(ConfigError, match="per-token states .* for aggregation 'min'"):
        probe.sequence_scores(pooled, "min")
    with pytest.raises(ConfigError, match="aggregation in"):
        probe.sequence_scores(cands, "max")
    with pytest.raises(DataError, match="at least one token"):
        probe.sequence_scores([np.zeros((0, 3))])


def test_the_orm_is_last_token_bt_through_the_same_class() -> None:
    chosen, rejected = literal_pairs()  # read as last-token states
    orm = TokenProbe(aggregation="last", loss="bt", seed=1).fit(pairs=(chosen, rejected), spec=spec("last"))
    lin = LinearProbe(loss="bt", seed=1).fit(pairs=(chosen, rejected), spec=spec("last"))
    x = np.concatenate([chosen, rejected])
    np.testing.assert_allclose(orm.score(x, spec("last")), lin.score(x), atol=1e-5)
    cands = [np.array([[9.0, 9.0, 9.0], *chosen[:1]]), rejected[1:3]]  # the ORM reads the last state only
    np.testing.assert_allclose(orm.sequence_scores(cands), orm.score(np.stack([chosen[0], rejected[2]])), atol=1e-12)
    with pytest.raises(SpecMismatchError, match="expected last-pooled features to train"):
        TokenProbe(aggregation="last", loss="bt").fit(pairs=(chosen, rejected), spec=spec("mean"))
    with pytest.raises(ConfigError, match="aggregation in"):
        TokenProbe(aggregation="min").fit(pairs=(chosen, rejected))


def test_scoring_refuses_states_whose_pooling_does_not_fit() -> None:
    probe = TokenProbe().fit(pairs=literal_pairs(), spec=spec("mean"))
    states = np.ones((4, 3))
    for call, match in [
        (lambda: probe.score(states, spec("tokens")), "expected mean-pooled features .* got tokens pooling"),
        (lambda: probe.score(states, spec("last")), "expected mean-pooled features .* got last pooling"),
        (lambda: probe.score_tokens(states, spec("mean")), "expected per-token states"),
        (lambda: probe.sequence_scores(states, spec=spec("tokens")), "wrap one completion"),
        (lambda: probe.score([states, np.ones((2, 3))]), "pooled features \\[n, d\\]"),
    ]:
        with pytest.raises(SpecMismatchError, match=match) as exc:
            call()
        assert "\n" not in str(exc.value)
    other_layer = FeatureSpec(pooling="tokens", **{**SPEC, "layer": 9})
    with pytest.raises(SpecMismatchError, match="layer 18"):
        probe.score_tokens(states, other_layer)
    assert probe.score_tokens(states, spec("tokens")).shape == (4,)
    with pytest.raises(ConfigError, match="pairwise loss"):
        TokenProbe(loss="pg").fit(np.ones((2, 3)), [1.0, 0.0], ["a", "a"], pair_rows=np.array([[0, 1]]))
    with pytest.raises(DataError, match="across prompts"):
        TokenProbe().fit(np.eye(3), [1.0, 0.0, 0.0], ["a", "a", "b"], pair_rows=np.array([[0, 2]]))


# ------------------------------------------------------------------------------ pairs from a run
# (prompt, reward) per row: A mixed, B all pass, C all fail, D unscored, E mixed with an unscored
# sample, F real-valued rewards (0.5 twice: no pair between the ties).
ROWS = [("A", 1.0), ("A", 0.0), ("A", 1.0), ("A", 0.0), ("B", 1.0), ("B", 1.0), ("C", 0.0), ("C", 0.0),
        ("D", None), ("D", None), ("E", 1.0), ("E", None), ("E", 0.0), ("F", 0.5), ("F", 0.2), ("F", 0.5)]
ALL_PAIRS = [(0, 1), (0, 3), (2, 1), (2, 3), (10, 12), (13, 14), (15, 14)]


@pytest.fixture
def literal_run(tmp_path: Path) -> Run:
    cols: dict[str, list] = {c: [] for c in ROW_COLUMNS}
    seen: dict[str, int] = {}
    for pid, reward in ROWS:
        j = seen[pid] = seen.get(pid, -1) + 1
        for c, v in zip(ROW_COLUMNS, [pid, ord(pid) - 65, j, f"prompt {pid}", f"c{j}", 1, "stop", reward, "{}", j],
                        strict=True):
            cols[c].append(v)
    tokens = [np.arange(3 * (1 + i % 3), dtype=np.float32).reshape(-1, 3) / 4 + i for i in range(len(ROWS))]  # ragged
    with RunWriter.create_or_open(tmp_path / "run", {"task": {"name": "literal"}}) as w:
        w.set_features({"L18_mean": spec("mean"), "L18_tokens": spec("tokens")})
        w.append(cols, {"L18_mean": np.arange(len(ROWS) * 3, dtype=np.float32).reshape(-1, 3), "L18_tokens": tokens})
    return Run.open(tmp_path / "run")


def test_pairs_from_a_literal_run_are_exact(literal_run: Run) -> None:
    rows = pairs_from_run(literal_run)
    assert list(zip(rows.chosen.tolist(), rows.rejected.tolist(), strict=True)) == ALL_PAIRS
    assert rows.prompt_ids() == ["A", "A", "A", "A", "E", "F", "F"] and rows.ids[0] == "A#0>1"
    chosen, rejected = rows.features("L18_mean")
    assert chosen[0].tolist() == [0.0, 1.0, 2.0] and rejected[4].tolist() == [36.0, 37.0, 38.0]
    assert ordered_pairs(np.array([1.0, 0.0, np.nan, 1.0]), np.array(["x", "x", "x", "y"])).tolist() == [[0, 1]]
    assert ordered_pairs(np.array([]), np.array([])).shape == (0, 2)


def test_a_runs_ragged_token_states_rank_by_the_trained_head(literal_run: Run) -> None:
    probe = TokenProbe().fit(pairs=pairs_from_run(literal_run).features("L18_mean"), spec=spec("mean"))
    states = list(literal_run.token_features("L18_tokens"))
    assert [len(s) for s in states[:4]] == [1, 2, 3, 1]
    got = probe.sequence_scores(states, spec=literal_run.feature_spec("L18_tokens"))
    pooled = np.stack([s.mean(axis=0) for s in states])  # [N, d]
    np.testing.assert_allclose(got, probe.score(pooled), rtol=0, atol=1e-9)
    assert probe.sequence_scores(states, "min").tolist() == [probe.score_tokens(s).min() for s in states]


def test_sampled_pairs_are_seeded_within_prompts_and_never_cross_a_split(literal_run: Run) -> None:
    full = pairs_from_run(literal_run, 2, seed=7)
    again = pairs_from_run(literal_run, 2, seed=7)
    got = list(zip(full.chosen.tolist(), full.rejected.tolist(), strict=True))
    assert got == list(zip(again.chosen.tolist(), again.rejected.tolist(), strict=True))
    assert set(got) <= set(ALL_PAIRS) and full.prompt_ids().count("A") == 2 and full.prompt_ids().count("F") == 2
    assert all(ROWS[a][0] == ROWS[b][0] for a, b in got)  # never across prompts
    draws = {tuple(pairs_from_run(literal_run, 2, seed=s).chosen.tolist() + pairs_from_run(
        literal_run, 2, seed=s).rejected.tolist()) for s in range(8)}
    assert len(draws) > 1  # the seed matters
    split = pairs_from_run(literal_run, 2, seed=7, prompts={"A", "B"})
    assert set(split.prompt_ids()) == {"A"}  # only the split's prompts ...
    assert list(zip(split.chosen.tolist(), split.rejected.tolist(), strict=True)) == got[:2]  # ... same draw per prompt
    with pytest.raises(DataError, match="among the 3 prompts asked for"):
        pairs_from_run(literal_run, prompts={"B", "C", "D"})
    with pytest.raises(ConfigError, match="pairs per prompt"):
        pairs_from_run(literal_run, 0)


# ------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def fake_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "fake"
    collect(CollectConfig(task="fake", split="train", out=out, n=8, backend="fake",
                          features=("-1:mean", "-1:last"), task_options={"size": 24}), progress=False)
    return out


def _expected_pairs(run_path: Path, hashes: set[str], cap: int) -> tuple[int, int]:
    """Independently: pairs and prompts of the training prompts (by prompt-text hash), 0/1 rewards."""
    rows = Run.open(run_path).table(["prompt", "reward"]).to_pylist()
    n_pairs = n_prompts = 0
    for h in hashes:
        rs = [r["reward"] for r in rows if prompt_hash(r["prompt"]) == h]
        mixed = sum(r == 1.0 for r in rs) * sum(r == 0.0 for r in rs)
        n_pairs, n_prompts = n_pairs + min(mixed, cap), n_prompts + (mixed > 0)
    return n_pairs, n_prompts


def test_train_pairs_from_a_run_end_to_end(fake_run: Path, tmp_path: Path) -> None:
    args = ["train", "--pairs-from", str(fake_run), "--feature", "-1:mean", "--pairs-per-prompt", "3",
            "--pair-seed", "1", "--holdout", "0.25", "--seed", "2"]
    res = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "qrm")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "qrm" / "config.json").read_text())
    assert config["architecture"] == "token" and config["hyper_parameters"] == {"aggregation": "mean"}
    assert config["loss"] == "margin_bt" and config["loss_options"] == {"beta": 0.2, "gamma": 2.0}
    pairs = config["source"]["pairs"]
    train_hashes = set(config["source"]["train_prompts"]["hashes"])
    assert len(train_hashes) == 18  # 24 prompts, a quarter held out: their samples never pair
    assert (pairs["n_pairs"], pairs["n_prompts"]) == _expected_pairs(fake_run, train_hashes, 3)
    assert pairs["n_pairs"] == config["history"]["n_pairs"] and (pairs["per_prompt"], pairs["seed"]) == (3, 1)
    assert f"pairs from run: {pairs['n_pairs']} pairs from {pairs['n_prompts']} of 18 training prompts" in res.output
    again = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "again")], catch_exceptions=False)
    assert again.exit_code == 0
    assert (tmp_path / "qrm" / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()
    run = Run.open(fake_run)
    probe = Probe.from_pretrained(tmp_path / "qrm", spec=run.feature_spec("L-1_mean"))
    assert isinstance(probe, TokenProbe) and probe.score(run.features("L-1_mean")).shape == (len(run),)
    orm = CliRunner().invoke(cli, ["train", "--pairs-from", str(fake_run), "--feature", "-1:last", "--loss", "bt",
                                   "--cv-folds", "3", "--out", str(tmp_path / "orm")], catch_exceptions=False)
    assert orm.exit_code == 0 and "3-fold CV" in orm.output
    loaded = Probe.from_pretrained(tmp_path / "orm")
    assert isinstance(loaded, TokenProbe) and loaded.aggregation == "last" and loaded.loss == "bt"
    assert _expected_pairs(fake_run, set(loaded.source_["train_prompts"]["hashes"]), 10**9)[0] == \
        loaded.source_["pairs"]["n_pairs"]


def test_train_pairs_from_bad_input_is_one_line(fake_run: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    rows = Run.open(fake_run).table(["prompt_id", "reward"]).to_pylist()
    by: dict[str, set] = {}
    for r in rows:
        by.setdefault(r["prompt_id"], set()).add(r["reward"])
    uniform = [p for p, rs in by.items() if len(rs) == 1]  # all pass or all fail
    assert uniform, "the fake run should have prompts whose samples all score the same"
    (tmp_path / "ids.txt").write_text("\n".join(uniform) + "\n")
    for extra, expected in [
        (["--feature", "-1:mean", "--prompts", str(tmp_path / "ids.txt")], f"among {len(uniform)} training prompts"),
        (["--loss", "pg"], "expected a pairwise loss"),
        (["--feature", "-1:mean", "--pairs-per-prompt", "0"], "pairs per prompt to be an integer >= 1"),
        ([], "one pooling"),  # the run's every pooled feature: mean and last
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["train", "--pairs-from", str(fake_run), "--cv-folds", "1", "--out", str(tmp_path / "x"), *extra])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as exc:
        main(["train", "--run", str(fake_run), "--pairs-per-prompt", "3", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2 and "with --pairs-from RUN only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
