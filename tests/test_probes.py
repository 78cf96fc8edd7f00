"""Probes: estimator contract, batching by prompt, both recipes, save/load, spec checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from qprobe.catalog import LOSSES  # noqa: E402
from qprobe.errors import ConfigError, DataError, NotFittedError, SpecMismatchError  # noqa: E402
from qprobe.features.spec import FeatureSpec  # noqa: E402
from qprobe.probes import LinearProbe, MLPProbe, Probe, TrainConfig, rerank_metrics, select_feature  # noqa: E402
from qprobe.probes.data import (  # noqa: E402
    fold_prompts,
    full_groups,
    make_examples,
    random_groups,
    split_prompts,
    within_prompt_pairs,
)

SPEC = FeatureSpec("fake", "fake-model", "ab" * 32, -1, "last", 12)


def toy(n_prompts: int = 40, n: int = 8, d: int = 12, seed: int = 0):
    """Per-prompt offsets (difficulty) plus one within-prompt direction that predicts the reward."""
    rng = np.random.default_rng(seed)
    offset = rng.normal(0, 3, (n_prompts, 1, d))
    x = offset + rng.normal(0, 1, (n_prompts, n, d))  # [P, n, d]
    logit = offset[:, :, 0] * 0.5 + 2.0 * x[:, :, 1] - 2.0 * offset[:, :, 1]
    r = (rng.random((n_prompts, n)) < 1 / (1 + np.exp(-logit))).astype(float)
    return x.reshape(-1, d).astype(np.float32), r.reshape(-1), np.repeat(np.arange(n_prompts), n)


FAST = TrainConfig(l2_grid=(1.0, 0.1, 0.01), max_iter=30)


# ------------------------------------------------------------------------------- batching
def test_split_is_by_prompt() -> None:
    groups = np.repeat(np.arange(10), 3)
    keep, held = split_prompts(groups, 0.3, np.random.default_rng(0))
    assert set(groups[keep]).isdisjoint(groups[held])
    assert len(set(groups[held])) == 3 and keep.size + held.size == 30
    with pytest.raises(ConfigError):
        split_prompts(groups, 1.0, np.random.default_rng(0))
    assert split_prompts(groups, 0.0, np.random.default_rng(0))[1].size == 0


def test_folds_hold_each_prompt_out_exactly_once() -> None:
    groups = np.repeat(np.array([5, 1, 9, 3, 7, 2, 8]), 2)  # 7 prompts, codes not 0..P-1
    folds = fold_prompts(groups, 3, np.random.default_rng(0))
    held = [set(groups[h]) for _, h in folds]
    assert sorted(len(h) for h in held) == [2, 2, 3]
    assert set().union(*held) == set(groups) and sum(len(h) for h in held) == 7
    for keep, h in folds:
        assert set(groups[keep]).isdisjoint(groups[h]) and keep.size + h.size == groups.size
    for bad in (1, 8):
        with pytest.raises(ConfigError, match="folds"):
            fold_prompts(groups, bad, np.random.default_rng(0))


def test_penalty_chosen_by_folds_is_the_best_mean_held_out_return() -> None:
    x, r, g = toy(seed=1)
    xt, rt, gt = toy(seed=2)
    cfg = TrainConfig(l2_grid=(10.0, 1.0, 0.1, 0.01), select_folds=4, patience=4)
    probe = LinearProbe(loss="pg", train=cfg).fit(x, r, g)
    path = probe.history_["l2_path"]
    assert [p["l2"] for p in path] == [10.0, 1.0, 0.1, 0.01]  # patience 4: the whole grid is tried
    best = max(path, key=lambda p: p["select_return"])  # max keeps the first (stronger) of ties
    assert probe.history_["l2"] == best["l2"]
    m = rerank_metrics(probe, xt, rt, gt, k=4)
    assert m["expected_return"] > m["pass@1"] + 0.05, m
    with pytest.raises(ConfigError, match="select_folds"):
        TrainConfig(select_folds=0)


def test_random_groups_hold_one_prompt_each_and_are_regrouped() -> None:
    x, r, g = np.zeros((23 + 4, 1)), np.zeros(27), np.array([0] * 23 + [1] * 4)
    ex = make_examples(x, r, g)
    b1 = random_groups(ex, 10, np.random.default_rng(0))
    # prompt 0: 23 samples -> 2 groups of 10 (3 left over); prompt 1: 4 samples -> one group of 4
    assert sorted(b1.mask.sum(1).tolist()) == [4, 10, 10]
    for row, m in zip(b1.index, b1.mask, strict=True):
        assert len(set(g[row[m]])) == 1 and len(set(row[m])) == m.sum()
    b2 = random_groups(ex, 10, np.random.default_rng(1))
    assert not np.array_equal(b1.index, b2.index)  # regrouped with new randomness


def test_full_groups_and_within_prompt_pairs() -> None:
    ex = make_examples(np.zeros((5, 1)), [1.0, 0.0, 0.0, 1.0, 0.5], ["a", "a", "b", "b", "b"])
    full = full_groups(ex)
    assert full.index.tolist() == [[0, 1, 0], [2, 3, 4]] and full.mask.tolist() == [[True, True, False], [True] * 3]
    pairs = within_prompt_pairs(ex).index
    assert sorted(map(tuple, pairs.tolist())) == [(0, 1), (3, 2), (3, 4), (4, 2)]
    with pytest.raises(DataError, match="different rewards"):
        within_prompt_pairs(make_examples(np.zeros((2, 1)), [1.0, 1.0], ["a", "a"]))


def test_pairs_become_two_row_groups() -> None:
    ex = make_examples(None, pairs=(np.ones((3, 2)), np.zeros((3, 2))))
    assert ex.features.shape == (6, 2) and ex.rewards.tolist() == [1, 1, 1, 0, 0, 0]
    assert ex.groups.tolist() == [0, 1, 2, 0, 1, 2]


# ---------------------------------------------------------------------- estimator contract
def test_estimator_contract() -> None:
    probe = LinearProbe(loss="pg", seed=3)
    assert not [k for k in vars(probe) if k.endswith("_")]
    with pytest.raises(NotFittedError, match="fit"):
        probe.score(np.zeros((2, 12)))
    x, r, g = toy()
    assert probe.fit(x, r, g) is probe
    learned = {k for k in vars(probe) if k.endswith("_")}
    assert {"params_", "mean_", "scale_", "history_", "n_features_in_"} <= learned
    q = probe.score(x)
    assert q.shape == (len(x),) and q.dtype == np.float32
    with pytest.raises(SpecMismatchError, match=r"\[N, 12\]"):
        probe.score(np.zeros((2, 5)))
    assert "LinearProbe(loss='pg'" in repr(probe)


@pytest.mark.parametrize("make", [lambda: LinearProbe(loss="pg", train=FAST),
                                  lambda: MLPProbe(loss="ce", depth=1, width=16, train=FAST)])
def test_same_seed_same_probe(make) -> None:
    x, r, g = toy()
    a, b = make().fit(x, r, g), make().fit(x, r, g)
    for key in a.params_:
        assert np.array_equal(a.params_[key], b.params_[key])


def test_mlp_seed_changes_the_init() -> None:
    x, r, g = toy()
    cfg = TrainConfig(l2_grid=(1.0,), max_iter=2)
    a = MLPProbe(loss="mse", depth=1, width=8, train=cfg, seed=0).fit(x, r, g)
    b = MLPProbe(loss="mse", depth=1, width=8, train=cfg, seed=1).fit(x, r, g)
    assert not np.array_equal(a.params_["layers.0.weight"], b.params_["layers.0.weight"])


@pytest.mark.parametrize("loss", LOSSES.names())  # every registered loss, not a hand-picked list
def test_every_loss_learns_to_rerank_with_the_fast_recipe(loss: str) -> None:
    x, r, g = toy(seed=1)
    xt, rt, gt = toy(seed=2)
    probe = LinearProbe(loss=loss, train=FAST).fit(x, r, g)
    m = rerank_metrics(probe, xt, rt, gt, k=4)
    assert m["expected_return"] > m["pass@1"] + 0.05, m
    assert probe.history_["l2"] in FAST.l2_grid and probe.standardized_


def test_paper_recipe_uses_raw_features_and_adamw() -> None:
    x, r, g = toy()
    cfg = TrainConfig(recipe="paper", epochs=3, lr=1e-2)
    probe = LinearProbe(loss="pg", train=cfg).fit(x, r, g)
    assert not probe.standardized_ and len(probe.history_["epoch_loss"]) == 3
    mlp = MLPProbe(loss="bt", depth=1, width=4, train=cfg).fit(x, r, g)
    assert np.isfinite(mlp.score(x)).all()


def test_fit_on_preference_pairs() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=6)
    a, b = rng.normal(size=(200, 6)), rng.normal(size=(200, 6))
    chosen = np.where((a @ w > b @ w)[:, None], a, b)
    rejected = np.where((a @ w > b @ w)[:, None], b, a)
    probe = LinearProbe(loss="bt", train=FAST).fit(pairs=(chosen, rejected))
    assert (probe.score(chosen) > probe.score(rejected)).mean() > 0.9


def test_bad_fit_inputs() -> None:
    x, r, g = toy()
    with pytest.raises(ConfigError, match="rewards of shape"):
        LinearProbe().fit(x, r[:-1], g)
    with pytest.raises(DataError, match="unscored"):
        LinearProbe().fit(x, np.where(np.arange(len(r)) == 0, np.nan, r), g)
    with pytest.raises(ConfigError, match="options of loss 'pg'"):
        LinearProbe(loss="pg", loss_options={"gamma": 1.0}).fit(x, r, g)
    with pytest.raises(ConfigError, match="recipe"):
        TrainConfig(recipe="slow")
    with pytest.raises(SpecMismatchError, match="dim 12"):
        LinearProbe().fit(x[:, :5], r, g, spec=SPEC)


def test_select_feature_prefers_the_informative_key() -> None:
    x, r, g = toy(n_prompts=60)
    noise = np.random.default_rng(5).normal(size=x.shape).astype(np.float32)
    best, table = select_feature({"noise": noise, "signal": x}, r, g, lambda: LinearProbe(train=FAST), seed=0)
    assert best == "signal" and table["signal"] > table["noise"]


# ------------------------------------------------------------------------------- save/load
@pytest.mark.parametrize("make", [lambda: LinearProbe(loss="pg", train=FAST),
                                  lambda: MLPProbe(loss="listwise", depth=2, width=8, train=FAST,
                                                   loss_options={"tau": 0.5})])
def test_save_load_round_trip_is_exact(tmp_path: Path, make) -> None:
    x, r, g = toy()
    probe = make().fit(x, r, g, spec=SPEC, source={"run": "runs/x", "feature": "L-1_last"})
    probe.save_pretrained(tmp_path / "p")
    probe.save_pretrained(tmp_path / "p")  # overwriting an existing probe is fine
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    loaded = Probe.from_pretrained(tmp_path / "p", spec=SPEC)
    assert type(loaded) is type(probe) and loaded.get_params().keys() == probe.get_params().keys()
    assert loaded.loss_options == probe.loss_options and loaded.train == probe.train
    assert np.array_equal(loaded.score(x), probe.score(x))
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["feature_spec"] == SPEC.to_dict() and config["source"]["run"] == "runs/x"
    assert config["format_version"] == 1 and config["standardize"] is True
    assert "runs/x" in (tmp_path / "p" / "README.md").read_text()


def test_spec_mismatch_is_refused_naming_both(tmp_path: Path) -> None:
    x, r, g = toy()
    LinearProbe(train=FAST).fit(x, r, g, spec=SPEC).save_pretrained(tmp_path / "p")
    other = FeatureSpec("fake", "fake-model", "ab" * 32, -2, "last", 12)
    with pytest.raises(SpecMismatchError, match="layer -1.*layer -2"):
        Probe.from_pretrained(tmp_path / "p", spec=other)
    probe = Probe.from_pretrained(tmp_path / "p")
    with pytest.raises(SpecMismatchError):
        probe.score(x, spec=FeatureSpec("fake", "other", "cd" * 32, -1, "last", 12))
    with pytest.raises(ConfigError, match="MLPProbe"):
        MLPProbe.from_pretrained(tmp_path / "p")


def test_corrupt_files_raise_one_clear_error(tmp_path: Path) -> None:
    x, r, g = toy()
    LinearProbe(train=FAST).fit(x, r, g).save_pretrained(tmp_path / "p")
    with pytest.raises(DataError, match="does not exist"):
        Probe.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="config.json and model.safetensors"):
        Probe.from_pretrained(tmp_path / "empty")
    (tmp_path / "p" / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(DataError, match="corrupt"):
        Probe.from_pretrained(tmp_path / "p")
    LinearProbe(train=FAST).fit(x, r, g).save_pretrained(tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    (tmp_path / "p" / "config.json").write_text(json.dumps({**cfg, "n_features_in": 7}))
    with pytest.raises(DataError, match="do not match"):
        Probe.from_pretrained(tmp_path / "p")
    (tmp_path / "p" / "config.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        Probe.from_pretrained(tmp_path / "p")
    (tmp_path / "p" / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(DataError, match="version"):
        Probe.from_pretrained(tmp_path / "p")
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="other files"):
        LinearProbe(train=FAST).fit(x, r, g).save_pretrained(tmp_path / "q")


def test_importing_probes_does_not_import_torch() -> None:
    code = "import sys, qprobe.probes, qprobe.probes.io; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_missing_local_path_is_an_error_not_a_hub_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """'probes/pg' used to become an unpinned download of huggingface.co/probes/pg."""
    hub = pytest.importorskip("huggingface_hub")
    calls: list = []
    monkeypatch.setattr(hub, "snapshot_download", lambda **kw: calls.append(kw))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="'probes/pg' which does not exist.*hf://ORG/NAME"):
        Probe.from_pretrained("probes/pg")
    assert calls == []


def test_hub_probes_load_pinned_through_huggingface_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hf://org/name@rev goes through huggingface_hub.snapshot_download with that revision (and
    local_files_only), and the commit it resolved is recorded; push uploads with HfApi.upload_folder."""
    hub = pytest.importorskip("huggingface_hub")
    x, r, g = toy()
    probe = LinearProbe(train=FAST).fit(x, r, g, spec=SPEC)
    snap = tmp_path / "cache" / "snapshots" / ("c0ffee" * 6 + "abcd")
    probe.save_pretrained(snap)
    calls: list = []

    def snapshot_download(**kw):
        calls.append(kw)
        return str(snap)

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    loaded = Probe.from_pretrained("hf://org/probe@v1", local_files_only=True)
    assert calls[0]["repo_id"] == "org/probe" and calls[0]["revision"] == "v1" and calls[0]["local_files_only"] is True
    assert loaded.source_["hub"] == {"repo": "org/probe", "revision": "v1", "commit": snap.name}
    assert np.array_equal(loaded.score(x), probe.score(x))
    Probe.from_pretrained("hf://org/probe")
    assert calls[1]["revision"] is None and calls[1]["local_files_only"] is False
    with pytest.raises(ConfigError, match="hf://ORG/NAME"):
        Probe.from_pretrained("hf://not-a-repo")

    def offline(**kw):
        raise hub.errors.LocalEntryNotFoundError("not in the cache")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(DataError, match="org/probe at revision v2 in the local cache"):
        Probe.from_pretrained("hf://org/probe@v2", local_files_only=True)

    uploads: list = []

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, **kw):
            uploads.append(("create", repo_id, kw))

        def upload_folder(self, folder_path, repo_id, **kw):
            uploads.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            return type("CommitInfo", (), {"oid": "deadbeef"})()

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    assert probe.push_to_hub("hf://org/probe") == "hf://org/probe@deadbeef"
    assert uploads[1] == ("upload", "org/probe", ["README.md", "config.json", "model.safetensors"])


def test_shipped_probe_loads_by_name_and_checks_its_features(tmp_path, monkeypatch) -> None:
    """`default-code` is packaged: it loads by name, scores the default model's layer-18 mean states,
    refuses another model's features, and a local folder of the same name wins."""
    from qprobe.errors import DataError, SpecMismatchError
    from qprobe.features.spec import FeatureSpec
    from qprobe.probes import Probe
    from qprobe.probes.token import TokenProbe

    probe = Probe.from_pretrained("default-code")
    assert isinstance(probe, TokenProbe) and probe.source_["pretrained"] == "default-code"
    spec = probe.feature_spec_
    assert (spec.layer, spec.pooling, spec.dim) == (18, "mean", 896)
    assert spec.sha256.startswith("1d9614638d18")  # the default GGUF's weights
    x = np.random.default_rng(0).standard_normal((3, 896)).astype(np.float32)
    assert probe.score(x, spec).shape == (3,)
    other = FeatureSpec(**{**spec.to_dict(), "sha256": "0" * 64, "model": "another"})
    with pytest.raises(SpecMismatchError):
        probe.score(x, other)
    mine = tmp_path / "default-code"  # a user's folder of that name wins over the shipped probe
    LinearProbe(loss="mse").fit(x, np.array([0.0, 1.0, 0.5])).save_pretrained(mine)
    monkeypatch.chdir(tmp_path)
    assert type(Probe.from_pretrained("default-code")) is LinearProbe
    with pytest.raises(DataError, match="default-code"):
        Probe.from_pretrained("no-such-probe")
