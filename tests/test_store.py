from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qprobe.collection.collect import CollectConfig, collect
from qprobe.errors import StoreError
from qprobe.store import Run, RunWriter


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
    from qprobe.collection.embed import add_features

    collect(fake_cfg(tmp_path / "r", features=("-1:last",)), progress=False)
    run = add_features(str(tmp_path / "r"), ["5:mean", "-1:last"], progress=False)
    assert sorted(run.feature_keys) == ["L-1_last", "L5_mean"]
    direct = collect(fake_cfg(tmp_path / "d", features=("5:mean",)), progress=False)
    np.testing.assert_array_equal(run.features("L5_mean", run.sorted_order()),
                                  direct.features("L5_mean", direct.sorted_order()))
    assert run.feature_spec("L5_mean").layer == 5


def test_copy_keeps_rows_and_only_the_named_features(tmp_path: Path) -> None:
    from qprobe.store.copy import copy_run

    src = collect(fake_cfg(tmp_path / "r", features=("-1:last", "2:mean", "-1:tokens")), progress=False)
    before = sorted(p.relative_to(src.path).as_posix() for p in src.path.rglob("*") if p.is_file())
    cp = copy_run(src.path, tmp_path / "c", ["L2_mean", "L-1_tokens"])
    assert cp.feature_keys == ["L2_mean", "L-1_tokens"]
    assert cp.table().equals(src.table())
    np.testing.assert_array_equal(cp.features("L2_mean"), src.features("L2_mean"))
    for a, b in zip(cp.token_features("L-1_tokens"), src.token_features("L-1_tokens"), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not (cp.path / "features" / "L-1_last").exists()
    assert cp.manifest["copied_from"]["features_dropped"] == ["L-1_last"]
    assert [k for k in cp.manifest if k not in ("features", "copied_from")] == \
        [k for k in src.manifest if k != "features"]
    assert sorted(p.relative_to(src.path).as_posix() for p in src.path.rglob("*") if p.is_file()) == before
    rows_only = copy_run(src.path, tmp_path / "t", [])
    assert rows_only.feature_keys == [] and len(rows_only) == len(src)
    assert list(tmp_path.glob(".tmp-*")) == []


def test_copy_refuses_bad_input_and_replaces_only_runs(tmp_path: Path) -> None:
    from qprobe.store.copy import copy_run

    src = collect(fake_cfg(tmp_path / "r", limit=2), progress=False)
    with pytest.raises(StoreError, match="L7_mean"):
        copy_run(src.path, tmp_path / "c", ["L7_mean"])
    assert not (tmp_path / "c").exists()
    copy_run(src.path, tmp_path / "c", ["L-1_last"])
    with pytest.raises(StoreError, match="--replace"):
        copy_run(src.path, tmp_path / "c", ["L2_mean"])
    with pytest.raises(StoreError, match="differ"):
        copy_run(src.path, src.path, [], replace=True)
    collect(fake_cfg(tmp_path / "r"), progress=False)  # the source grows; the copy is refreshed
    cp = copy_run(src.path, tmp_path / "c", ["L2_mean"], replace=True)
    assert len(cp) == 18 and cp.feature_keys == ["L2_mean"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="other files"):
        copy_run(src.path, tmp_path / "other", [], replace=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    assert list(tmp_path.glob(".tmp-*")) == []
