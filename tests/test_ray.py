"""`qprobe collect --ray`: a local Ray cluster with two CPU workers, the fake back-end and fake task."""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import run_cli

from qprobe.collection import distributed
from qprobe.collection.collect import CollectConfig, collect
from qprobe.errors import ConfigError, StoreError
from qprobe.store import Run

ray = pytest.importorskip("ray")

FEATURES = ("-1:last", "3:tokens")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


def config(out: Path, **kw: Any) -> CollectConfig:
    base: dict[str, Any] = dict(task="fake", backend="fake", split="train", n=4, out=out, task_options={"size": 12},
                                limit=10, features=FEATURES, shard_samples=4)
    return CollectConfig(**{**base, **kw})


def rows(run: Run) -> list[dict]:
    return run.table().take(run.sorted_order()).to_pylist()


def keys(run: Run) -> list[tuple[str, int]]:
    return [(r["prompt_id"], r["sample_index"]) for r in rows(run)]


def assert_same_run(got: Run, want: Run) -> None:
    """Same rows and features in (prompt, sample) order, and the manifest a single-process run writes."""
    assert rows(got) == rows(want)
    go, wo = got.sorted_order(), want.sorted_order()
    np.testing.assert_array_equal(got.features("L-1_last")[go], want.features("L-1_last")[wo])
    gt, wt = list(got.token_features("L3_tokens")), list(want.token_features("L3_tokens"))
    for i, j in zip(go, wo, strict=True):
        np.testing.assert_array_equal(gt[i], wt[j])
    drop = {"created", "updated", "shards"}
    assert {k: v for k, v in got.manifest.items() if k not in drop} | {"config": None} == \
        {k: v for k, v in want.manifest.items() if k not in drop} | {"config": None}
    assert json.loads(json.dumps(got.manifest["config"])) == {**want.manifest["config"], "out": str(got.path)}


def test_rows_identical_to_single_process_and_a_plain_resume_accepts_the_run(cluster, tmp_path: Path) -> None:
    want = collect(config(tmp_path / "one", prompt_ids=tuple(f"train/{i}" for i in (0, 2, 3, 5, 7, 8, 9, 11))),
                   progress=False)
    cfg = config(tmp_path / "ray", prompt_ids=tuple(f"train/{i}" for i in (0, 2, 3, 5, 7, 8, 9, 11)))
    got = distributed.collect_ray(cfg, distributed.RayConfig(workers=2, chunk_prompts=2), progress=False)
    assert got.stats.workers == 2 and got.stats.chunks == 4 and got.stats.merged == 28  # --limit 10 drops 11
    assert len(got.run.shards) == 4 and got.run.manifest["complete"] is True
    assert_same_run(got.run, want)
    assert not (got.run.path / distributed.WORKERS_DIR).exists()
    again = collect(cfg, progress=False)  # the same command without --ray continues the same run
    assert len(again) == 28 and len(again.shards) == 4


def test_a_killed_worker_s_chunk_is_redone_from_its_committed_shards(cluster, tmp_path: Path) -> None:
    cfg = config(tmp_path / "ray", backend_options={"delay": 0.1}, n=4, limit=8)
    killed: list[int] = []

    def on_dispatch(actor: Any, chunk: int, chunk_dir: Path) -> None:
        if chunk != 0 or killed:
            return

        def kill_after_first_shard() -> None:  # a real actor death, mid-chunk
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if json.loads((chunk_dir / "manifest.json").read_text()).get("shards"):
                        break
                except (OSError, ValueError):
                    pass
                time.sleep(0.01)
            ray.kill(actor)
            killed.append(chunk)

        threading.Thread(target=kill_after_first_shard, daemon=True).start()

    got = distributed.collect_ray(cfg, distributed.RayConfig(workers=2, chunk_prompts=4), progress=False,
                                  on_dispatch=on_dispatch)
    assert killed == [0] and got.stats.lost_actors == 1
    assert got.stats.reused >= 4  # the dead actor's first shard was resumed, not made again
    assert keys(got.run) == [(f"train/{i}", j) for i in range(8) for j in range(4)]
    want = collect(dataclasses.replace(cfg, out=tmp_path / "one", backend_options={}), progress=False)
    assert rows(got.run) == rows(want)


def test_rerun_adds_nothing(cluster, tmp_path: Path) -> None:
    cfg = config(tmp_path / "ray", limit=6)
    first = distributed.collect_ray(cfg, distributed.RayConfig(workers=2), progress=False)
    again = distributed.collect_ray(cfg, distributed.RayConfig(workers=2), progress=False)
    assert again.stats.chunks == 0 and again.stats.merged == 0
    assert len(again.run.shards) == len(first.run.shards) and rows(again.run) == rows(first.run)


@pytest.mark.parametrize("where", ["append", "discard"])
def test_an_interrupted_merge_completes_on_rerun_without_duplicates(
        cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """The driver dies in the second chunk's merge: while appending its shard (nothing committed), or
    after committing it but before removing the chunk's run (the rerun merges it again: adds nothing)."""
    cfg = config(tmp_path / "ray", limit=8)
    calls = {"n": 0}
    if where == "append":
        real = distributed.RunWriter.append

        def failing(self: Any, *a: Any, **kw: Any) -> Any:
            if self.path == cfg.out:
                calls["n"] += 1
                if calls["n"] == 2:
                    raise KeyboardInterrupt
            return real(self, *a, **kw)

        monkeypatch.setattr(distributed.RunWriter, "append", failing)
    else:
        real_discard = distributed._discard

        def failing_discard(path: Path) -> None:
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            real_discard(path)

        monkeypatch.setattr(distributed, "_discard", failing_discard)
    with pytest.raises(KeyboardInterrupt):
        distributed.collect_ray(cfg, distributed.RayConfig(workers=2, chunk_prompts=2), progress=False)
    monkeypatch.undo()
    part = Run.open(cfg.out)
    assert len(part.shards) == (1 if where == "append" else 2) and not part.manifest["complete"]
    assert (cfg.out / distributed.WORKERS_DIR).is_dir()
    got = distributed.collect_ray(cfg, distributed.RayConfig(workers=2, chunk_prompts=2), progress=False)
    assert got.stats.leftovers >= 1
    assert keys(got.run) == [(f"train/{i}", j) for i in range(8) for j in range(4)]  # none twice, none lost
    assert rows(got.run) == rows(collect(dataclasses.replace(cfg, out=tmp_path / "one"), progress=False))
    assert not (cfg.out / distributed.WORKERS_DIR).exists()


def test_cli_flag(cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["collect", "--task", "fake", "--backend", "fake", "--task-option", "size=5", "--n", "2",
            "--out", str(tmp_path / "run"), "--no-progress"]
    code, out, err = run_cli([*args, "--ray", "--ray-workers", "2"], capsys)
    assert code == 0, err
    assert "ray: 2 workers" in err and "10 samples" in out
    code, _, err = run_cli([*args, "--ray-workers", "2"], capsys)
    assert code == 2 and "expected --ray-workers with --ray" in err
    # a worker's QProbeError (here collect's own refusal to resume with other settings) is one line, exit 2
    code, _, err = run_cli([*args, "--temperature", "0.5", "--ray", "--ray-workers", "2"], capsys)
    assert code == 2 and "expected the settings of the existing run" in err and len(err.strip().splitlines()) == 1


def test_a_worker_that_cannot_see_the_run_says_so(tmp_path: Path) -> None:
    cfg = config(tmp_path / "elsewhere" / distributed.WORKERS_DIR / "chunk-00000")
    worker = distributed.CollectWorker(cfg.to_dict(), {})  # in this process: the same code a Ray actor runs
    with pytest.raises(StoreError, match="on a filesystem this Ray worker"):
        worker.run(cfg.to_dict(), str(tmp_path / "elsewhere"))


def test_unreachable_address_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="expected a Ray cluster listening at 127.0.0.1:9"):
        distributed._check_reachable("127.0.0.1:9")
    with pytest.raises(ConfigError, match="expected --ray HOST:PORT"):
        distributed._check_reachable("nowhere")
    distributed._check_reachable(None)
    distributed._check_reachable("auto")


def test_missing_extra_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    code, _, err = run_cli(["collect", "--task", "fake", "--backend", "fake", "--out", str(tmp_path / "r"),
                            "--no-progress", "--ray"], capsys)
    assert code == 2 and "pip install 'qprobe[ray]'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_ray_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="--ray-workers >= 1"):
        distributed.RayConfig(workers=0)


@pytest.mark.slow
def test_real_model_two_llamacpp_workers(tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2 workers x llama.cpp's default model, 4 MBPP prompts x 2 samples: every key once, none missing."""
    from qprobe.generation.base import SamplingConfig

    monkeypatch.setenv("QPROBE_ALLOW_CODE_EXECUTION", "1")  # forwarded to the actors
    cfg = CollectConfig(task="mbpp", split="test", n=2, out=tmp_path / "ray", limit=4,
                        task_options={"data": str(shared_data / "mbpp" / "mbpp.jsonl")},
                        backend_options={"n_threads": 1}, sampling=SamplingConfig(max_new_tokens=32))
    ray.init(num_cpus=2, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        got = distributed.collect_ray(cfg, distributed.RayConfig(workers=2, chunk_prompts=1), progress=False)
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    ids = distributed._selected(cfg)
    assert len(ids) == 4
    assert keys(got.run) == [(p, j) for p in ids for j in range(2)]  # sorted order: none twice, none missing
    assert got.run.manifest["complete"] is True and got.stats.chunks == 4
    print(f"2 llama.cpp workers, 4 MBPP prompts x 2: {seconds:.1f} s, start {got.stats.start_seconds:.1f} s")
