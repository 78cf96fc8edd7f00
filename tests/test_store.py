from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qprobe.errors import StoreError
from qprobe.store import Run, RunWriter
from qprobe.store.collect import CollectConfig, collect


def fake_cfg(out: Path, **kw) -> CollectConfig:
    base = dict(task="fake", split="train", out=out, n=3, backend="fake", shard_samples=4,
                task_options={"size": 6}, features=("-1:last", "2:mean"))
    base.update(kw)
    return CollectConfig(**base)


def test_collect_writes_every_pair_once(tmp_path: Path) -> None:
    run = collect(fake_cfg(tmp_path / "r"), progress=False)
    assert len(run) == 18
    assert run.pairs() == {(f"train/{i}", j) for i in range(6) for j in range(3)}
    assert run.manifest["complete"] is True
    assert sorted(run.feature_keys) == ["L-1_last", "L2_mean"]
    x = run.features("L-1_last")
    assert x.shape == (18, 16) and x.dtype == np.float32
    sel = run.features("L2_mean", rows=np.array([17, 0, 5]))
    np.testing.assert_array_equal(sel, run.features("L2_mean")[[17, 0, 5]])
    assert len(run.shards) == 3  # 3 samples a prompt, a shard once >= 4 are pending


def test_features_are_memory_mapped(tmp_path: Path) -> None:
    run = collect(fake_cfg(tmp_path / "r"), progress=False)
    shards = list(run.feature_shards("L-1_last"))
    assert all(isinstance(a, np.memmap) for a in shards)


def test_resume_adds_only_missing_samples(tmp_path: Path) -> None:
    collect(fake_cfg(tmp_path / "r", limit=2), progress=False)
    run = collect(fake_cfg(tmp_path / "r", n=5), progress=False)
    assert len(run) == 30
    whole = collect(fake_cfg(tmp_path / "w", n=5), progress=False)
    key = lambda r: sorted(r.table().drop_columns(["prompt_index"]).to_pylist(), key=lambda d: (d["prompt_id"], d["sample_index"]))  # noqa: E731
    assert key(run) == key(whole)


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    from qprobe.generation.base import SamplingConfig

    collect(fake_cfg(tmp_path / "r", limit=1), progress=False)
    with pytest.raises(StoreError, match="sampling"):
        collect(fake_cfg(tmp_path / "r", sampling=SamplingConfig(temperature=0.1)), progress=False)
    with pytest.raises(StoreError, match="features"):
        collect(fake_cfg(tmp_path / "r", features=("-1:last",)), progress=False)


def test_orphan_files_are_removed_and_ignored(tmp_path: Path) -> None:
    run = collect(fake_cfg(tmp_path / "r", limit=2), progress=False)
    # Simulate a crash after the files of shard N were renamed but before the manifest listed it.
    nxt = f"shard-{len(run.shards):05d}"
    (tmp_path / "r" / "rows" / f"{nxt}.parquet").write_bytes(b"garbage")
    (tmp_path / "r" / "features" / "L-1_last" / f".tmp-1-{nxt}.npy").write_bytes(b"half")
    assert len(Run.open(tmp_path / "r")) == 6
    run = collect(fake_cfg(tmp_path / "r"), progress=False)
    assert len(run) == 18
    assert not list((tmp_path / "r").rglob(".tmp-*"))


def test_open_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="manifest.json"):
        Run.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(StoreError, match="corrupt"):
        Run.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(StoreError, match="format version"):
        Run.open(tmp_path)


def test_second_writer_is_refused(tmp_path: Path) -> None:
    w = RunWriter.create_or_open(tmp_path / "r", {"task": {}})
    try:
        with pytest.raises(StoreError, match="another qprobe process"):
            RunWriter.create_or_open(tmp_path / "r", {"task": {}})
    finally:
        w.close()


def test_out_dir_with_other_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("mine")
    with pytest.raises(StoreError, match="other files"):
        collect(fake_cfg(tmp_path), progress=False)
    assert (tmp_path / "x.txt").read_text() == "mine"


def test_token_features_round_trip(tmp_path: Path) -> None:
    run = collect(fake_cfg(tmp_path / "r", features=("-1:tokens",), limit=2), progress=False)
    states = list(run.token_features("L-1_tokens"))
    t = run.table(["n_tokens"]).column("n_tokens").to_pylist()
    assert [len(s) for s in states] == [max(n, 1) for n in t]
    with pytest.raises(StoreError, match="token_features"):
        run.features("L-1_tokens")


def test_embed_adds_features_to_an_existing_run(tmp_path: Path) -> None:
    from qprobe.store.embed import add_features

    collect(fake_cfg(tmp_path / "r", features=("-1:last",)), progress=False)
    run = add_features(str(tmp_path / "r"), ["5:mean", "-1:last"], progress=False)
    assert sorted(run.feature_keys) == ["L-1_last", "L5_mean"]
    direct = collect(fake_cfg(tmp_path / "d", features=("5:mean",)), progress=False)
    np.testing.assert_array_equal(run.features("L5_mean", run.sorted_order()),
                                  direct.features("L5_mean", direct.sorted_order()))
    assert run.feature_spec("L5_mean").layer == 5
