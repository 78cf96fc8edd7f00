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
    with pytest.raises(StoreError, match="features among the run's"):
        collect(fake_cfg(tmp_path / "r", features=("-1:last", "3:last")), progress=False)


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


def test_embed_token_states_round_trip_through_the_store(tmp_path: Path) -> None:
    """Ragged per-token states computed by `embed` for an existing run equal those collected with
    the samples, row for row."""
    from qprobe.collection.embed import add_features

    collect(fake_cfg(tmp_path / "r", features=("2:mean",)), progress=False)
    run = add_features(str(tmp_path / "r"), ["2:tokens"], dtype="float16", progress=False)
    assert run.feature_keys == ["L2_mean", "L2_tokens"]
    direct = collect(fake_cfg(tmp_path / "d", features=("2:tokens",)), progress=False)
    got, want = list(run.token_features("L2_tokens")), list(direct.token_features("L2_tokens"))
    assert len(got) == len(run) and [len(a) for a in got] == [len(b) for b in want]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a.astype(np.float32), b, rtol=1e-3, atol=1e-3)  # float16 storage
    assert run.feature_spec("L2_tokens").dtype == "float16"
    assert (run.path / "features" / "L2_tokens" / "shard-00000.offsets.npy").is_file()
    from qprobe.store.summary import run_summary

    line = run_summary(run.path)["features"]["L2_tokens"]
    assert f"[{sum(len(a) for a in got)} tokens, " in line and "on disk" in line


def test_copy_of_some_prompts_keeps_exactly_their_rows(tmp_path: Path) -> None:
    from qprobe.store.copy import copy_run

    src = collect(fake_cfg(tmp_path / "r", features=("-1:last", "-1:tokens")), progress=False)
    ids = src.table(["prompt_id"]).column("prompt_id").to_pylist()
    wanted = sorted(set(ids))[1:4]
    cp = copy_run(src.path, tmp_path / "c", ["L-1_last", "L-1_tokens"], prompts=wanted)
    rows = [i for i, p in enumerate(ids) if p in wanted]
    assert cp.table().equals(src.table().take(rows))
    np.testing.assert_array_equal(cp.features("L-1_last"), src.features("L-1_last", np.array(rows)))
    all_states = list(src.token_features("L-1_tokens"))
    for a, i in zip(cp.token_features("L-1_tokens"), rows, strict=True):
        np.testing.assert_array_equal(a, all_states[i])
    assert [s.id for s in cp.shards] == list(range(len(cp.shards)))
    assert cp.manifest["n_prompts"] == 3 and cp.manifest["subset"]["rows"] == len(rows)
    with pytest.raises(StoreError, match="does not"):
        copy_run(src.path, tmp_path / "x", [], prompts=["no-such-prompt"])
    assert not (tmp_path / "x").exists()


def test_embed_cli_on_some_prompts_writes_a_subset_run(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from qprobe.cli.main import cli, main

    src = collect(fake_cfg(tmp_path / "r", features=("-1:last",)), progress=False)
    wanted = sorted(set(src.table(["prompt_id"]).column("prompt_id").to_pylist()))[:2]
    (tmp_path / "ids.txt").write_text("\n".join(wanted) + "\n")
    args = ["embed", str(src.path), "--feature", "3:tokens", "--prompts", str(tmp_path / "ids.txt"),
            "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and not (tmp_path / "s").exists()
    res = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    sub = Run.open(tmp_path / "s")
    assert sub.feature_keys == ["L-1_last", "L3_tokens"] and len(sub) == 2 * 3
    assert "L3_tokens" not in Run.open(src.path).feature_keys  # the source run is only read


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


def test_features_refuse_rows_outside_the_run(tmp_path: Path) -> None:
    run = collect(fake_cfg(tmp_path / "r", limit=2), progress=False)  # 6 rows
    for rows in ([6], [-1], [0, 100]):
        with pytest.raises(StoreError, match=r"row numbers in \[0, 6\)"):
            run.features("L-1_last", rows=np.array(rows))


_COMMIT = """
import sys
from qprobe.collection.collect import CollectConfig, collect
collect(CollectConfig(task="fake", split="train", out=sys.argv[1], n=3, backend="fake", shard_samples=4,
                      task_options={"size": 6}, features=("-1:last", "2:mean"), limit=4), progress=False)
"""


def test_a_writer_reads_the_manifest_under_its_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process commits shards between this writer's first look at the run and its lock: the
    writer must see them (read after the lock), not delete them as leftovers of a crash."""
    import fcntl
    import os
    import subprocess
    import sys

    out = tmp_path / "r"
    collect(fake_cfg(out, limit=2), progress=False)
    before = len(Run.open(out).shards)
    real, calls = fcntl.flock, []

    def flock(fd, op):
        if not calls:
            calls.append(op)
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
            subprocess.run([sys.executable, "-c", _COMMIT, str(out)], check=True, env=env)
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    with RunWriter.create_or_open(out, {}) as writer:
        assert calls and len(writer.shards) > before
    monkeypatch.undo()
    run = Run.open(out)
    assert len(run) == 12 and run.features("L-1_last").shape == (12, 16)  # every listed shard's files exist


def test_manifest_records_what_the_sampler_applies(tmp_path: Path) -> None:
    run = collect(fake_cfg(tmp_path / "r", limit=1), progress=False)
    assert run.manifest["sampler"] == {"server": None, "chain": "seeded uniform draw", "stop": ["\n\n"], "max_tokens": 300}


def test_resume_after_embed_keeps_every_feature_without_listing_them(tmp_path: Path) -> None:
    """`qprobe embed` adds a feature; resuming collect (CLI: no --feature; Python: a subset) writes
    every feature of the run into the new shards, instead of asking for them all again."""
    from click.testing import CliRunner

    from qprobe.cli.main import cli
    from qprobe.collection.embed import add_features

    out = tmp_path / "r"
    args = ["collect", "--task", "fake", "--backend", "fake", "--task-option", "size=6", "--out", str(out),
            "--no-progress", "--shard-samples", "4"]
    assert CliRunner().invoke(cli, [*args, "--n", "2", "--feature", "-1:last"]).exit_code == 0
    add_features(str(out), ["2:mean"], progress=False)
    res = CliRunner().invoke(cli, [*args, "--n", "3"])
    assert res.exit_code == 0, res.output
    run = Run.open(out)
    assert len(run) == 18 and sorted(run.feature_keys) == ["L-1_last", "L2_mean"]
    whole = collect(fake_cfg(tmp_path / "w", features=("-1:last", "2:mean")), progress=False)
    order = run.sorted_order()
    np.testing.assert_allclose(run.features("L2_mean")[order], whole.features("L2_mean")[whole.sorted_order()])
    # the library: asking for part of the run's features resumes with all of them
    run = collect(fake_cfg(out, n=4, features=("2:mean",)), progress=False)
    assert len(run) == 24 and run.features("L-1_last").shape == (24, 16)


def test_unscored_rows_are_scored_again_on_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reward that failed (null, as a sandbox error) is retried on the stored completion when the
    collection resumes: no new sample, the same rows, now scored."""
    (tmp_path / "flaky_reward.py").write_text(
        "from pathlib import Path\n"
        f"FLAG = Path({str(tmp_path / 'down')!r})\n"
        "def score(prompt, completion):\n"
        "    return None if FLAG.exists() else float(len(completion) % 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}"}) + "\n" for i in range(3)))
    cfg = CollectConfig(task="jsonl", split="all", out=tmp_path / "r", n=2, backend="fake", features=("-1:last",),
                        task_options={"data": str(data), "reward": "flaky_reward:score"})
    (tmp_path / "down").touch()
    run = collect(cfg, progress=False)
    assert run.manifest["verdicts"]["unscored"] == 6 and all(r is None for r in run.table(["reward"]).column(0).to_pylist())
    before = run.table(["prompt_id", "sample_index", "completion"]).to_pylist()
    (tmp_path / "down").unlink()
    run = collect(cfg, progress=False)
    t = run.table(["prompt_id", "sample_index", "completion", "reward"]).to_pylist()
    assert [{k: r[k] for k in ("prompt_id", "sample_index", "completion")} for r in t] == before
    assert [r["reward"] for r in t] == [float(len(r["completion"]) % 2) for r in t]
    assert run.manifest["verdicts"] == {"scored": 6, "unscored": 0, "timeouts": 0, "timeout_rate": 0.0}


def test_timeout_rate_is_recorded_and_inspected(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qprobe.store.summary import run_summary as summarize

    out = tmp_path / "r"
    run = collect(fake_cfg(out, limit=2), progress=False)  # 6 rows
    shard = out / "rows" / f"{run.shards[0].name}.parquet"
    t = pq.read_table(shard)
    details = t.column("details").to_pylist()
    rewards = t.column("reward").to_pylist()
    for i in (0, 1):  # two samples hit the time limit (reward 0, status timeout)
        details[i], rewards[i] = json.dumps({"status": "timeout"}), 0.0
    t = t.set_column(t.schema.get_field_index("details"), "details", pa.array(details, pa.string()))
    pq.write_table(t.set_column(t.schema.get_field_index("reward"), "reward", pa.array(rewards, pa.float64())), shard)
    run = collect(fake_cfg(out, limit=2), progress=False)  # nothing to add: the counts are taken again
    assert run.manifest["verdicts"] == {"scored": 6, "unscored": 0, "timeouts": 2, "timeout_rate": round(2 / 6, 6)}
    info = summarize(out)
    assert info["timeout rate"].startswith("0.3333 (2 of 6 scored samples hit the time limit)")
    assert info["sampler"]["chain"] == "seeded uniform draw"
